"""The Responses and Conversations APIs' stored objects, in the server's records (same database, same
transactions as sessions): responses, conversations, and the items of either.

A stored response keeps the Response object as it was returned and the chat history it reached (its
conversation through its output, without its instructions): ``previous_response_id`` continues from
that history, which the kept turns (``kept``) resume without feeding it again. A conversation is a
session under the same id; its items are what the Conversations API lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .records import SqlRecords


@dataclass
class StoredResponse:
    id: str
    body: dict
    history: list[dict]
    turn_key: str | None


class Objects:
    def __init__(self, records: SqlRecords):
        self.records = records

    def _write(self, statements: list[tuple[str, tuple]], appended: tuple[str, list[dict]] | None = None) -> None:
        """One transaction: ``statements``, then ``appended`` items after the owner's last (numbered inside
        the transaction, so two writers never take the same place)."""
        r = self.records
        with r.lock, r._transaction() as cur:
            for statement, params in statements:
                cur.execute(r._sql(statement), params)
            if appended and appended[1]:
                owner, items = appended
                cur.execute(r._sql("SELECT COALESCE(MAX(seq) + 1, 0) FROM items WHERE owner = ?"), (owner,))
                for statement, params in self._item_rows(owner, cur.fetchone()[0], items):
                    cur.execute(r._sql(statement), params)

    # -- responses ----------------------------------------------------------------------------------
    def add_response(self, resp: StoredResponse, created: float, items: list[dict], conversation_items: list[dict]):
        """One transaction: the response, its input items, and the items it adds to its conversation."""
        statements = [("INSERT INTO responses (id, created, body, history, turn_key) VALUES (?, ?, ?, ?, ?)",
                       (resp.id, created, json.dumps(resp.body), json.dumps(resp.history), resp.turn_key))]  # fmt: skip
        statements += self._item_rows(resp.id, 0, items)
        conv = (resp.body.get("conversation") or {}).get("id")
        self._write(statements, (conv, conversation_items) if conv else None)

    def response(self, rid: str) -> StoredResponse | None:
        rows = self.records._rows("SELECT id, body, history, turn_key FROM responses WHERE id = ?", (rid,))
        if not rows:
            return None
        r = rows[0]
        return StoredResponse(r[0], json.loads(r[1]), json.loads(r[2]), r[3])

    def delete_response(self, rid: str) -> str | None:
        """Forget the response and its input items; returns the kept turn it reached (None: no such response)."""
        stored = self.response(rid)
        if stored is None:
            return None
        self._write([("DELETE FROM responses WHERE id = ?", (rid,)), ("DELETE FROM items WHERE owner = ?", (rid,))])
        return stored.turn_key or ""

    # -- conversations ------------------------------------------------------------------------------
    def add_conversation(self, cid: str, created: float, metadata: dict, items: list[dict]) -> None:
        statements = [("INSERT INTO conversations (id, created, metadata) VALUES (?, ?, ?)",
                       (cid, created, json.dumps(metadata)))]  # fmt: skip
        self._write(statements + self._item_rows(cid, 0, items))

    def conversation(self, cid: str) -> dict | None:
        rows = self.records._rows("SELECT id, created, metadata FROM conversations WHERE id = ?", (cid,))
        if not rows:
            return None
        return {"id": rows[0][0], "object": "conversation", "created_at": int(rows[0][1]),
                "metadata": json.loads(rows[0][2])}  # fmt: skip

    def set_metadata(self, cid: str, metadata: dict) -> None:
        self._write([("UPDATE conversations SET metadata = ? WHERE id = ?", (json.dumps(metadata), cid))])

    def delete_conversation(self, cid: str) -> None:
        self._write([("DELETE FROM conversations WHERE id = ?", (cid,)), ("DELETE FROM items WHERE owner = ?", (cid,))])

    # -- items --------------------------------------------------------------------------------------
    def add_items(self, owner: str, items: list[dict]) -> None:
        self._write([], (owner, items))

    def items(self, owner: str) -> list[dict]:
        """The owner's items, oldest first."""
        return [
            json.loads(r[0])
            for r in self.records._rows("SELECT body FROM items WHERE owner = ? ORDER BY seq", (owner,))
        ]

    def item(self, item_id: str, owners: list[str]) -> dict | None:
        """The item ``item_id`` among those of ``owners`` (an ``item_reference``'s target)."""
        for owner in owners:
            rows = self.records._rows("SELECT body FROM items WHERE owner = ? AND id = ?", (owner, item_id))
            if rows:
                return json.loads(rows[0][0])
        return None

    def delete_item(self, owner: str, item_id: str) -> bool:
        if not self.records._rows("SELECT 1 FROM items WHERE owner = ? AND id = ?", (owner, item_id)):
            return False
        self._write([("DELETE FROM items WHERE owner = ? AND id = ?", (owner, item_id))])
        return True

    @staticmethod
    def _item_rows(owner: str, first: int, items: list[dict]) -> list[tuple[str, tuple]]:
        return [("INSERT INTO items (owner, seq, id, body) VALUES (?, ?, ?, ?)", (owner, first + i, it["id"], json.dumps(it)))
                for i, it in enumerate(items)]  # fmt: skip
