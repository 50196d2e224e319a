"""The peer of bench/bench_serve.py: an inference service written the way such services
usually are: FastAPI, the model in a `transformers.pipeline("text-classification")` loaded
once at start-up, one pipeline call per request (a plain `def` endpoint: FastAPI runs it in
its thread pool, so concurrent requests run concurrent pipeline calls).

    PEER_MODEL_DIR=... uvicorn bench.serve_peer:app --port 8001
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

pipe = pipeline("text-classification", model=os.environ["PEER_MODEL_DIR"], device=-1)
app = FastAPI()


class Request(BaseModel):
    text: str


@app.post("/predict")
def predict(req: Request) -> dict:
    best = pipe(req.text)[0]
    return {"label": best["label"], "score": best["score"]}


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
