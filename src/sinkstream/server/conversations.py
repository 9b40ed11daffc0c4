"""``/v1/conversations``: OpenAI's Conversations API, mapped onto sessions.

A conversation is a session under the same id: ``responses.create(conversation=…)`` serves the next turn
of that session, and its items (what this API lists) are the conversation's messages as the client
holds them. Items added here are fed with the next response; an item deleted here changes the
history the next response continues, which the session follows (it goes back to the deepest kept turn
before the change, ``resume``).
"""

from __future__ import annotations

import time

from . import items as I
from .errors import ApiError
from .objects import Objects
from .responses import page
from .responses_protocol import ConversationCreate, ConversationUpdate, ItemsCreate
from .store import SessionBusy, SessionNotFound, SessionStore


class ConversationsServing:
    def __init__(self, objects: Objects, store: SessionStore):
        self.objects, self.store = objects, store

    def create(self, body: ConversationCreate) -> dict:
        cid = I.new_id("conv")
        new = self._items(body.items or [])
        self.objects.add_conversation(cid, time.time(), body.metadata or {}, new)
        return self.retrieve(cid)

    def retrieve(self, cid: str) -> dict:
        conv = self.objects.conversation(cid)
        if conv is None:
            raise ApiError(404, f"no conversation '{cid}'", code="conversation_not_found", param="conversation_id")
        return conv

    def update(self, cid: str, body: ConversationUpdate) -> dict:
        self.retrieve(cid)
        self.objects.set_metadata(cid, body.metadata or {})
        return self.retrieve(cid)

    def delete(self, cid: str) -> dict:
        self.retrieve(cid)
        try:
            self.store.delete(cid)
        except SessionNotFound:
            pass  # no response was made in it yet
        except SessionBusy:
            raise ApiError(409, f"conversation '{cid}' is answering a request; delete it afterwards",
                           code="conversation_busy") from None  # fmt: skip
        self.objects.delete_conversation(cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def add_items(self, cid: str, body: ItemsCreate) -> dict:
        self.retrieve(cid)
        new = self._items(body.items)
        self.objects.add_items(cid, new)
        return {"object": "list", "data": new, "first_id": new[0]["id"], "last_id": new[-1]["id"], "has_more": False}

    def list_items(self, cid: str, after: str | None, limit: int, order: str) -> dict:
        self.retrieve(cid)
        return page(self.objects.items(cid), after, limit, order)

    def item(self, cid: str, item_id: str) -> dict:
        self.retrieve(cid)
        found = self.objects.item(item_id, [cid])
        if found is None:
            raise ApiError(404, f"no item '{item_id}' in conversation '{cid}'", code="item_not_found", param="item_id")
        return found

    def delete_item(self, cid: str, item_id: str) -> dict:
        self.item(cid, item_id)
        self.objects.delete_item(cid, item_id)
        return self.retrieve(cid)

    @staticmethod
    def _items(raw) -> list[dict]:
        new = [I.stored(it.model_dump(exclude_none=True, by_alias=True)) for it in raw]
        I.to_messages(new)  # refuses what a chat cannot hold (images, other item types)
        return new
