r"""A LangChain/LangGraph voice agent.

``from_langchain`` takes any runnable: a chat model, a chain, or a LangGraph graph such
as ``create_agent``'s (streamed with ``stream_mode="messages"``; only the AI's words are
spoken).

Install, run it, then talk to it from another terminal, from the directory holding the
clone (``./layercode-asgi``, as in the README)::

    pip install './layercode-asgi[langchain,server]'
    LAYERCODE_WEBHOOK_SECRET=whsec_test OPENAI_API_KEY=sk-… \
        python layercode-asgi/examples/langchain_agent.py
    layercode-asgi simulate --secret whsec_test "Hello"
"""

import os

from langchain.agents import create_agent
from langchain_openai import ChatOpenAI

from layercode_asgi import Settings, create_app
from layercode_asgi.adapters import from_langchain

settings = Settings()
if not settings.webhook_secrets:
    raise SystemExit("Set LAYERCODE_WEBHOOK_SECRET to your agent's webhook secret.")
if not settings.openai_api_key:
    raise SystemExit("Set OPENAI_API_KEY (and OPENAI_BASE_URL for another OpenAI-compatible API).")

graph = create_agent(
    ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-5-nano"), api_key=settings.openai_api_key),
    tools=[],
    system_prompt="You are a friendly voice assistant. Answer in one or two short sentences.",
)
app = create_app(settings, from_langchain(graph, welcome="Hi! What can I do for you?"))

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
