"""Agents written with an LLM framework, as LayerCode agents, in one call::

    from layercode_asgi.adapters import from_pydantic_ai

    agent = from_pydantic_ai(Agent("openai:gpt-5-nano", instructions="Answer briefly."))
    app = create_app(Settings(), agent)

* :func:`from_pydantic_ai` — a ``pydantic_ai.Agent`` (extra ``pydantic-ai``);
* :func:`from_langchain` — a LangChain runnable or a LangGraph graph (extra ``langchain``);
* :func:`from_openai_agents` — an OpenAI Agents SDK ``Agent`` (extra ``openai-agents``).

Each returns a plain agent (``agent(event, context)``): ``context.history`` becomes the
framework's message history, the streamed text is spoken phrase by phrase as it arrives,
a tool call is preceded by a short filler, and tools may :func:`send_data` or
:func:`hang_up` (see :mod:`layercode_asgi.adapters.voice`). Importing this package needs
none of the frameworks; an adapter called without its framework raises
:class:`MissingExtraError` (a ``ConfigurationError``) naming the extra to install.
"""

from __future__ import annotations

from .langchain import from_langchain, langchain_messages
from .openai_agents import from_openai_agents, openai_agents_input
from .pydantic_ai import from_pydantic_ai, pydantic_ai_history
from .voice import (
    DEFAULT_FILLER,
    Chunking,
    Filler,
    MissingExtraError,
    PhraseChunker,
    current_turn,
    hang_up,
    send_data,
)

__all__ = [
    "DEFAULT_FILLER",
    "Chunking",
    "Filler",
    "MissingExtraError",
    "PhraseChunker",
    "current_turn",
    "from_langchain",
    "from_openai_agents",
    "from_pydantic_ai",
    "hang_up",
    "langchain_messages",
    "openai_agents_input",
    "pydantic_ai_history",
    "send_data",
]
