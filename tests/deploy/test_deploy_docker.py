"""The Dockerfiles (no engine here: parsed and checked structurally) and the HJSERVE_* settings
used across the deploy files."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILES,
    EXPECTED_CMD,
    K8S_DIR,
    KSERVE_DIR,
    REPO,
    arg_default,
    final_stage,
    load_yaml,
    parse_dockerfile,
)


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[tuple[str, str]]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_known_instructions_only(dockerfile) -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "LABEL",
             "ENTRYPOINT"}
    for ins, _ in dockerfile[1]:
        assert ins in known, ins


def test_runtime_stage_is_non_root_with_healthcheck_and_cmd(dockerfile) -> None:
    _, instructions = dockerfile
    stage = final_stage(instructions)
    users = [a for i, a in stage if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the runtime stage must run as a non-root user"
    (health,) = [a for i, a in stage if i == "HEALTHCHECK"]
    assert "/v2/health/ready" in health and "--interval=" in health
    cmds = [a for i, a in stage if i == "CMD"]
    assert json.loads(cmds[-1]) == EXPECTED_CMD
    exposed = " ".join(a for i, a in stage if i == "EXPOSE").split()
    assert "8000" in exposed and "8001" in exposed   # HTTP and gRPC
    assert not [a for i, a in stage if i == "ENTRYPOINT"]
    # The user is set after everything that needs root.
    assert max(n for n, (i, _) in enumerate(stage) if i == "RUN") < max(n for n, (i, _) in enumerate(stage) if i == "USER")


def test_copy_sources_exist_and_are_not_ignored(dockerfile) -> None:
    name, instructions = dockerfile
    ignore = (DOCKERFILES[name].parent / (DOCKERFILES[name].name + ".dockerignore")).read_text().split()
    allowed = {p[1:].rstrip("*").rstrip("/") for p in ignore if p.startswith("!")}
    for ins, args in instructions:
        if ins != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist in the repository"
            assert src.rstrip("/") in allowed, f"{name}: COPY source {src} is excluded by the .dockerignore"


def test_demo_models_built_into_the_image(dockerfile) -> None:
    _, instructions = dockerfile
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "python -m hjmodel.demo --out /models" in runs
    stage = final_stage(instructions)
    assert any(i == "COPY" and "--from=build" in a and "/models /models" in a for i, a in stage)


def test_torch_pin_matches_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (version,) = [d.removeprefix("torch==") for d in project["dependencies"] if d.startswith("torch==")]
    for name, path in DOCKERFILES.items():
        instructions = parse_dockerfile(path)
        assert arg_default(instructions, "TORCH_VERSION") == version, name
        runs = " ".join(a for i, a in instructions if i == "RUN")
        assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs, name


def test_cpu_image() -> None:
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    assert arg_default(instructions, "PYTHON_IMAGE") == "python:3.11-slim"
    assert arg_default(instructions, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert [a for i, a in instructions if i == "FROM"] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_cuda_image() -> None:
    instructions = parse_dockerfile(DOCKERFILES["cuda"])
    base = arg_default(instructions, "CUDA_IMAGE")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert arg_default(instructions, "TORCH_INDEX_URL").endswith(f"/cu{cuda[0]}{cuda[1]}"), "torch CUDA = base CUDA"
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert 'pip install ".[gpu]"' in runs and "pip uninstall -y onnxruntime " in runs
    assert "CUDAExecutionProvider" in runs
    # onnxruntime-gpu is built for one CUDA major (PyPI: 1.27 and later for CUDA 13, 1.18-1.26 for CUDA
    # 12), and the provider lists itself even where that CUDA's libraries are missing (it then runs
    # on the CPU): an unpinned onnxruntime-gpu on a CUDA 12 image was 1.31 (CUDA 13) -- docs/GPU.md
    ort = arg_default(instructions, "ONNXRUNTIME_GPU_VERSION")
    assert re.fullmatch(r"\d+\.\d+\.\d+", ort), ort
    assert ('"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in runs
            and "onnxruntime-gpu>" not in runs), "the image installs the pinned onnxruntime-gpu"
    ort_cuda = 13 if tuple(map(int, ort.split(".")[:2])) >= (1, 27) else 12
    assert ort_cuda == int(cuda[0]), f"onnxruntime-gpu {ort} is built for CUDA {ort_cuda}, the image is CUDA {cuda[0]}"
    # and the build fails if the provider's libraries do not resolve (all but the driver's libcuda,
    # which only a GPU host has)
    assert "libonnxruntime_providers_cuda.so" in runs and "ldd" in runs and "libcuda.so.1" in runs
    env = " ".join(a for i, a in final_stage(instructions) if i == "ENV")
    assert "HJSERVE_DEVICE=auto" in env


def _settings_fields() -> set[str]:
    from service.settings import Settings

    return {"HJSERVE_" + name.upper() for name in Settings.model_fields}


def test_every_hjserve_variable_is_a_setting() -> None:
    """A misspelled HJSERVE_ variable would stop the server at startup (Settings refuses a variable
    that names no setting): none in any manifest."""
    fields = _settings_fields()
    used: dict[str, str] = {}
    for path in [*DOCKERFILES.values(), COMPOSE_FILE, *K8S_DIR.rglob("*.yaml"), *KSERVE_DIR.rglob("*.yaml")]:
        for var in re.findall(r"\bHJSERVE_[A-Z_]+\b", path.read_text()):
            used[var] = str(path.relative_to(REPO))
    assert {"HJSERVE_DEVICE", "HJSERVE_MAX_QUEUE_SIZE", "HJSERVE_MAX_BATCH_SIZE"} <= set(used)
    for var, where in used.items():
        assert var in fields, f"{where}: {var} is not a service setting ({sorted(fields)})"
    configmap = load_yaml(K8S_DIR / "base" / "configmap.yaml")["data"]
    assert set(configmap) <= fields
