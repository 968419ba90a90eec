"""`grace serve judge` (heavy imports stay inside the function)."""

from __future__ import annotations

import typer


def serve(
    host: str = typer.Option(None, help="bind address (default: GRACE_JUDGE_HOST or 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default: GRACE_JUDGE_PORT or 8200)"),
) -> None:
    """LLM-as-a-judge API (appendix E) over any OpenAI-compatible backend."""
    import uvicorn

    from services.judge.app import create_app
    from services.judge.config import JudgeSettings

    settings = JudgeSettings()
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="warning")
