"""A test-only ComfyUI node pack: conditioning and latents of the right shapes, no text encoder.

Loaded by tests/test_comfyui_e2e.py through an extra_model_paths.yaml (``custom_nodes``). The
end-to-end tests replace each text encoder node of the shipped workflows with
``TetriServeTestConditioning`` (same text, a seeded random context and pooled vector of the tiny
models' widths), so no text-encoder weights are needed.
"""
from __future__ import annotations

import asyncio
import hashlib

import torch
from comfy_api.latest import ComfyExtension, io


def _seed_of(text: str, salt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{text}".encode()).digest()[:8], "little")


class TetriServeTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TetriServeTestConditioning",
            display_name="TetriServe Test Conditioning",
            category="TetriServe/testing",
            description="Seeded random CONDITIONING [1, tokens, context_dim] + pooled [1, pooled_dim] (tests only).",
            inputs=[
                io.String.Input("text", multiline=True, default=""),
                io.Int.Input("tokens", default=8, min=1, max=4096),
                io.Int.Input("context_dim", default=32, min=1, max=8192),
                io.Int.Input("pooled_dim", default=16, min=1, max=8192),
                io.Int.Input("seed", default=0, min=0, max=2**31),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text: str, tokens: int, context_dim: int, pooled_dim: int, seed: int) -> io.NodeOutput:
        g = torch.Generator().manual_seed(_seed_of(text, seed) % 2**63)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return io.NodeOutput([[context, {"pooled_output": pooled}]])


class TetriServeTestLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TetriServeTestLatent",
            display_name="TetriServe Test Latent",
            category="TetriServe/testing",
            description="A seeded random non-zero LATENT (an encoded image stand-in, tests only).",
            inputs=[
                io.Int.Input("width", default=128, min=16, max=4096, step=16),
                io.Int.Input("height", default=128, min=16, max=4096, step=16),
                io.Int.Input("batch_size", default=1, min=1, max=16),
                io.Int.Input("channels", default=16, min=1, max=64),
                io.Int.Input("seed", default=0, min=0, max=2**31),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int, channels: int, seed: int) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        samples = torch.randn(batch_size, channels, height // 8, width // 8, generator=g) * 0.5
        return io.NodeOutput({"samples": samples})


class TetriServeTestFailLater(io.ComfyNode):
    """An async node that fails after a delay: a failing sibling of a running TetriServe Sampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TetriServeTestFailLater",
            display_name="TetriServe Test Fail Later",
            category="TetriServe/testing",
            inputs=[io.Float.Input("delay_s", default=1.0, min=0.0, max=60.0)],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    async def execute(cls, delay_s: float) -> io.NodeOutput:
        await asyncio.sleep(delay_s)
        raise RuntimeError(f"TetriServeTestFailLater failed on purpose after {delay_s} s")


class _TestPack(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TetriServeTestConditioning, TetriServeTestLatent, TetriServeTestFailLater]


def comfy_entrypoint() -> ComfyExtension:
    return _TestPack()
