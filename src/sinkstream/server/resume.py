"""Where a chat request starts: which state it goes on from, and which of its messages are new.

Every request is matched message by message against what the server kept (``history``, ``kept``):

- no session: the deepest kept turn whose messages equal the request's first messages is resumed
  (``resumed``) and only the rest is fed; nothing kept matches: the whole request is streamed through
  a fresh cache (``new``);
- a session and a request with no assistant message: the messages are the next turn (``appended``),
  as sessions always took them — unless the session has one turn and the request is its question again
  (a regenerate of the first answer), which is asked afresh (``restarted``);
- a session and a request that carries assistant messages (a client that resends its history): it
  ``continued`` when it extends the session's transcript; when it departs from it (regenerate, edit,
  a branch) the session goes back to the deepest kept turn the request matches (``branched``), or,
  when nothing kept covers it, the request's history is streamed afresh into the session
  (``restarted``). A session's first request may resume a kept turn like a request without one.

A conversation's beginning (its system prompt, its tools, the pin chosen for it, see ``pinning``) is
part of what is matched: a request whose beginning differs matches nothing kept before it. A session
whose next messages bring a new system prompt, or other tools, is ``restarted``: its transcript, with
the new beginning, is streamed afresh into a cache that pins it (never the old prefix with new
messages); the same system prompt again is not a new message.

So a turn is never fed twice, and a client pays for its new messages only wherever the server kept
the turn before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..chat import Conversation
from . import history
from .store import Session, SessionStore

SYSTEM_ROLES = ("system", "developer")


def _as_returned(message: dict) -> dict:
    """A kept message as its client holds it (an answer's text as it was returned)."""
    return {**message, "content": message.get("shown", message["content"])}


@dataclass
class Start:
    state: Session  # the conversation to go on from: the leased session, or an anonymous copy
    new: list[dict]  # the request's messages to render and feed
    new_digests: list[str]  # their digests (continuing the state's)
    mode: str  # new | resumed | appended | continued | branched | restarted
    cached_tokens: int  # the request's prompt tokens resumed instead of fed


class Resumer:
    def __init__(self, store: SessionStore, scope: str):
        self.store, self.scope = store, scope  # scope: the model and cache configuration (``history.root``)

    def plan(self, msgs: list[dict], tools: Sequence[dict] | None, session: Session | None, pin="auto") -> Start:
        scope = self.scope if pin == "auto" else f"{self.scope}/pin:{pin}"  # states made with another pin differ
        digests = history.chain(tools, scope, msgs)
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if session is not None and not session.new:
            return self._in_session(session, msgs, digests, answers, tools, scope)
        state = session if session is not None else Session(None, Conversation(), None)
        found = self._deepest(digests, answers)
        if found is None:
            return self._fresh(state, msgs, digests, "new")
        index, kept = found
        if session is None:
            state = kept
        else:
            session.go_back(kept)
        return Start(state, msgs[index + 1 :], digests[index + 1 :], "resumed", state.tokens_seen)

    def _in_session(self, session: Session, msgs, digests, answers, tools, scope: str) -> Start:
        if not answers and self._asks_first_turn_again(session, digests):
            session.go_back(None)  # a regenerate of the only turn there is: its question again, no answer
            return self._fresh(session, msgs, digests, "restarted")
        if not answers:  # only new messages: the session's next turn, as sessions always took them
            return self._appended(session, msgs, tools, scope)
        n = len(session.digests)
        if n and len(session.conversation.messages) == n and len(msgs) >= n and digests[n - 1] == session.digests[-1]:
            return Start(session, msgs[n:], digests[n:], "continued", session.tokens_seen)
        found = self._deepest(digests, answers)
        if found is None:
            session.go_back(None)
            return self._fresh(session, msgs, digests, "restarted")
        index, kept = found
        session.go_back(kept)
        return Start(session, msgs[index + 1 :], digests[index + 1 :], "branched", session.tokens_seen)

    def _appended(self, session: Session, msgs: list[dict], tools, scope: str) -> Start:
        """The session's next messages; a new system prompt or other tools among them restart it."""
        conv = session.conversation
        system = [m for m in msgs if m["role"] in SYSTEM_ROLES]
        rest = [m for m in msgs if m["role"] not in SYSTEM_ROLES]
        same_system = all(history.client_form(m)["content"] == (conv.system or "").strip() for m in system)
        if not (same_system and self._same_beginning(session, tools, scope)):
            head = system[-1:] or [m for m in conv.messages[:1] if m["role"] in SYSTEM_ROLES]
            full = head + [dict(m) for m in conv.messages if m["role"] not in SYSTEM_ROLES] + rest
            session.go_back(None)
            return self._fresh(session, full, history.chain(tools, scope, [_as_returned(m) for m in full]), "restarted")
        msgs = rest if system else msgs  # the same system prompt again is not a new message
        fed = len(session.digests) == len(conv.messages)
        prev = session.digests[-1] if session.digests else history.root(tools, scope)
        return Start(session, msgs, history.extend(prev, msgs) if fed else [], "appended", 0)

    @staticmethod
    def _same_beginning(session: Session, tools, scope: str) -> bool:
        """The request's tools and pin are those the session started with (its first digest covers them; a
        session without digests is taken as it is)."""
        messages = session.conversation.messages
        if not messages or len(session.digests) != len(messages):
            return True
        return history.extend(history.root(tools, scope), messages[:1])[0] == session.digests[0]

    @staticmethod
    def _asks_first_turn_again(session: Session, digests: list[str]) -> bool:
        """The request is the question of a session's one and only turn, again (what a client that resends
        its history sends to regenerate the first answer)."""
        if session.turns != 1 or len(session.digests) != len(session.conversation.messages):
            return False
        roles = [m["role"] for m in session.conversation.messages]
        asked = roles.index("assistant") if "assistant" in roles else -1
        return asked == len(digests) and digests[-1] == session.digests[asked - 1]

    def _deepest(self, digests: list[str], answers: list[int]) -> tuple[int, Session] | None:
        found = self.store.resume([(i, digests[i]) for i in answers])
        return None if found is None else (found[0], found[1])

    @staticmethod
    def _fresh(state: Session, msgs: list[dict], digests: list[str], mode: str) -> Start:
        """The whole request into an empty state: its answers so far count as the conversation's turns."""
        conv = state.conversation
        conv.system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        conv.turns = sum(m["role"] == "assistant" for m in msgs)
        state.rewrite = True  # its transcript is written whole, each message under the turn it belongs to
        return Start(state, msgs, digests, mode, 0)
