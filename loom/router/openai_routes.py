"""The OpenAI-compatible API as TGI serves it: /v1/models (chat and completions routes follow)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/v1/models", tags=["OpenAI"])
async def models(request: Request) -> JSONResponse:
    model_id = request.app.state.loom.config.model_id
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": model_id},
    ]})
