"""Loading models from the live artifact set, shared by retrieval and ranking."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from mesh.health import HealthCheck


def onnx_session(path: str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session sized for a latency-bound server.

    One intra-op thread and no spinning: requests run concurrently on the event loop,
    so a pool of spinning threads would only steal CPU from the other requests.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def artifacts_check(version_dir: Path) -> HealthCheck:
    """Healthy while the artifact set the service loaded is still on disk (manifest present)."""

    async def probe() -> None:
        if not (version_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{version_dir}/manifest.json is gone")

    return HealthCheck("artifacts", probe)
