r"""An outdoor-shop voice agent on pydantic-ai, with tools.

A tool looks up the stock and shows it in the browser (``send_data``); another ends the
call after the goodbye (``hang_up``). While a lookup runs, the caller hears "Let me check."

Install, run it, then talk to it from another terminal, from the directory holding the
clone (``./layercode-asgi``, as in the README)::

    pip install './layercode-asgi[pydantic-ai,server]'
    LAYERCODE_WEBHOOK_SECRET=whsec_test OPENAI_API_KEY=sk-… \
        python layercode-asgi/examples/pydantic_ai_shop.py
    layercode-asgi simulate --secret whsec_test "Do you have tents?"
"""

import os

from pydantic_ai import Agent

from layercode_asgi import Settings, create_app
from layercode_asgi.adapters import from_pydantic_ai, hang_up, send_data

settings = Settings()
if not settings.webhook_secrets:
    raise SystemExit("Set LAYERCODE_WEBHOOK_SECRET to your agent's webhook secret.")
if not settings.openai_api_key:
    raise SystemExit("Set OPENAI_API_KEY (and OPENAI_BASE_URL for another OpenAI-compatible API).")

STOCK = {"tent": 4, "sleeping bag": 0, "headlamp": 12}

shop = Agent(
    settings.default_model,  # "openai:gpt-5-nano" unless DEFAULT_MODEL says otherwise
    instructions=(
        "You are the voice assistant of Trail Outfitters, an outdoor shop. Answer in one or "
        "two short spoken sentences. Use check_stock for availability; call end_call when "
        "the customer says goodbye, after saying goodbye yourself."
    ),
)


@shop.tool_plain
def check_stock(item: str) -> str:
    """How many of an item the shop has in stock."""
    count = STOCK.get(item.lower().strip(), 0)
    send_data({"item": item, "in_stock": count})  # the browser shows it (response.data)
    return f"{count} in stock"


@shop.tool_plain
def end_call() -> str:
    """End the call (once the customer has said goodbye)."""
    hang_up()  # response.hangup, after the rest of the answer is spoken
    return "The call will end after your reply."


agent = from_pydantic_ai(
    shop,
    welcome="Welcome to Trail Outfitters! What are you looking for today?",
    filler=lambda tool: "Let me check." if tool == "check_stock" else None,
)
app = create_app(settings, agent)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
