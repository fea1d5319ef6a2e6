"""omnistream serve: the engine on the wire.

    app = build_app(engine, ServerConfig(api_key="..."))   # a FastAPI app; uvicorn runs it

One module per concern: config (typed limits and switches), state (what every route shares),
auth (API key -> tenant salt), errors (OpenAI error objects), chat (POST /v1/chat/completions),
sessions_api (pinned sessions over HTTP), realtime (/v1/realtime live WebSocket), web (the page
at /), ops (/health, /metrics, /v1/models), app (assembles them).
"""
