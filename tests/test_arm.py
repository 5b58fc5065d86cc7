"""ARM: the parity logic on x86 alone, MAC counting, the wheel check's markers, and (slow, when
qemu-aarch64-static and the cached arm64 userland exist) the parity run under emulation."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_retrieval.benchmarks import arm_parity

from edge_retrieval.bundle import Bundle
from edge_retrieval.errors import BundleError

from .fixtures_bundles import sounds_dir

REPO = Path(__file__).resolve().parent.parent
ARM_CACHE = Path(os.environ.get("EDGE_RETRIEVAL_ARM_CACHE", Path.home() / ".cache" / "edge-retrieval" / "arm64"))


def _experts(bundle: Bundle) -> list[dict]:
    return [e.model_dump(include={"name", "output_kind", "output_name", "extra_outputs"})
            for e in bundle.manifest.device.experts]


@pytest.fixture(scope="module")
def outputs(birdnet_bundle: Bundle) -> dict[str, np.ndarray]:
    """Front end + ONNX outputs of 4 real-recording windows per expert, on this machine."""
    sounds = sounds_dir()
    if sounds is None:
        pytest.skip("no fixture recordings (scripts/fetch_sounds.py)")
    windows = arm_parity.make_windows(birdnet_bundle, arm_parity.pick_files(sounds, 4))
    res: dict[str, np.ndarray] = {}
    for spec in birdnet_bundle.manifest.device.experts:
        w = windows[f"{spec.name}/windows"]
        assert w.shape == (4, round(spec.sample_rate * spec.window_s))
        res.update(arm_parity.expert_outputs(birdnet_bundle, spec, w))
        res[f"{spec.name}/windows_sha256"] = np.array(arm_parity._sha({"w": w}))
    return res


def test_same_machine_twice_is_identical(birdnet_bundle: Bundle, outputs: dict[str, np.ndarray]) -> None:
    spec = birdnet_bundle.manifest.device.experts[0]
    again = arm_parity.expert_outputs(birdnet_bundle, spec, arm_parity.make_windows(
        birdnet_bundle, arm_parity.pick_files(sounds_dir(), 4))[f"{spec.name}/windows"])
    again[f"{spec.name}/windows_sha256"] = outputs[f"{spec.name}/windows_sha256"]
    rows = arm_parity.compare(outputs, {**outputs, **again}, _experts(birdnet_bundle))
    # every expert: the front end, the main output and each extra output
    expected = sum(2 + len(e.extra_outputs) for e in birdnet_bundle.manifest.device.experts)
    assert len(rows) == expected
    assert all(r.max_abs_diff == 0.0 and r.cosine_min == pytest.approx(1.0) for r in rows)
    assert [r.top1_agreement for r in rows if r.role == "labels"] == [1.0] * len(birdnet_bundle.manifest.device.experts)
    assert arm_parity.verdict(rows) == []


def test_perturbed_outputs_are_caught(birdnet_bundle: Bundle, outputs: dict[str, np.ndarray]) -> None:
    spec = birdnet_bundle.manifest.device.experts[0]
    main = f"{spec.name}/out/{spec.output_name}"
    bad = {k: np.array(v, copy=True) for k, v in outputs.items()}
    # window 0: another label overtakes the top one
    row = bad[main][0]
    row[(int(row.argmax()) + 1) % row.size] = row.max() + 1.0
    # a small shift of the front end: reported, within what a cosine check allows
    bad[f"{spec.name}/frontend"][1] += 1e-3
    rows = {r.output: r for r in arm_parity.compare(outputs, bad, _experts(birdnet_bundle))}
    assert rows[spec.output_name].top1_agreement == pytest.approx(3 / 4)
    assert rows["frontend"].max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    fails = arm_parity.verdict(list(rows.values()))
    assert len(fails) == 1 and spec.output_name in fails[0] and "top-1" in fails[0]

    for extra in spec.extra_outputs:  # an embedding turned the other way fails on cosine
        flipped = {k: np.array(v, copy=True) for k, v in outputs.items()}
        flipped[f"{spec.name}/out/{extra}"][2] *= -1
        fails = arm_parity.verdict(arm_parity.compare(outputs, flipped, _experts(birdnet_bundle)))
        assert len(fails) == 1 and extra in fails[0] and "cosine" in fails[0]
        flipped[f"{spec.name}/out/{extra}"][3, 0] = np.nan
        assert any("non-finite" in f for f in arm_parity.verdict(
            arm_parity.compare(outputs, flipped, _experts(birdnet_bundle))))


def test_outputs_of_other_windows_are_refused(birdnet_bundle: Bundle, outputs: dict[str, np.ndarray]) -> None:
    spec = birdnet_bundle.manifest.device.experts[0]
    other = {**outputs, f"{spec.name}/windows_sha256": np.array("0" * 64)}
    with pytest.raises(BundleError, match="different windows"):
        arm_parity.compare(outputs, other, _experts(birdnet_bundle))


def test_loudest_window_and_padding() -> None:
    x = np.zeros(10, dtype=np.float32)
    x[6] = 1.0
    assert np.array_equal(arm_parity.loudest_window(x, 3), x[6:9])
    assert arm_parity.loudest_window(x[:2], 3).shape == (3,)


def test_macs_of_a_small_graph_match_the_shapes(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from edge_retrieval.benchmarks import macs
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = numpy_helper.from_array(rng.standard_normal((8 * 8 * 8, 5)).astype(np.float32), "g")
    m = numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([-1, 8 * 8 * 8], dtype=np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "g"], ["y"]),
             helper.make_node("MatMul", ["y", "m"], ["z"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 7])],
                              initializer=[w, g, m, shape])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    res = macs.count_graph(path)
    conv = (8 * 8 * 8) * (3 * 3 * 3)  # output elements x (C_in x kH x kW)
    assert res.by_op == {"Conv": conv, "Gemm": 8 * 8 * 8 * 5, "MatMul": 5 * 7}
    assert res.macs == sum(res.by_op.values()) and res.unknown == []
    assert macs.count_graph(path, batch=4).macs == 4 * res.macs


def test_wheel_check_evaluates_markers_for_the_target_python() -> None:
    spec = importlib.util.spec_from_file_location("arm_wheels", REPO / "scripts" / "arm_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reqs = ["numpy>=1.24", "tomli>=2.0; python_version < '3.11'", "x; platform_machine == 'x86_64'"]
    assert mod.for_target(reqs, "3.10") == ["numpy>=1.24", "tomli>=2.0"]
    assert mod.for_target(reqs, "3.13") == ["numpy>=1.24"]
    assert "manylinux_2_28_aarch64" in mod.platforms(35) and "manylinux_2_36_aarch64" not in mod.platforms(35)
    assert mod.wheel_tag("onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl") == "cp311 manylinux_2_28_aarch64"


@pytest.mark.slow
def test_parity_under_aarch64_emulation(birdnet_bundle: Bundle, tmp_path: Path) -> None:
    """12 windows per expert through front end + ONNX on emulated aarch64 (Cortex-A72) vs here."""
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-aarch64-static not installed (apt-get install qemu-user-static)")
    if not (ARM_CACHE / "rootfs-bookworm" / ".complete").is_file():
        pytest.skip(f"no arm64 userland in {ARM_CACHE} (run bash scripts/arm_check.sh once)")
    if sounds_dir() is None:
        pytest.skip("no fixture recordings (scripts/fetch_sounds.py)")
    out = tmp_path / "arm"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "arm_check.sh"), "--no-build", "--parity-only", "--windows", "12",
         "--cache", str(ARM_CACHE), "--out", str(out), "--sounds", str(sounds_dir()), str(birdnet_bundle.root)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HOSTPY": sys.executable})
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / birdnet_bundle.root.name / "parity.json").read_text())
    assert report["test"]["machine"] == "aarch64" and report["failures"] == []
    names = {(r["expert"], r["output"]) for r in report["rows"]}
    for spec in birdnet_bundle.manifest.device.experts:
        assert {(spec.name, "frontend"), (spec.name, spec.output_name)} | {(spec.name, x) for x in spec.extra_outputs} <= names
    for r in report["rows"]:
        assert r["windows"] == 12 and r["finite"]
        if r["role"] == "labels":
            assert r["top1_agreement"] >= 0.99


def test_arm_check_refuses_bad_input_in_one_line(birdnet_bundle: Bundle, tmp_path: Path) -> None:
    script = str(REPO / "scripts" / "arm_check.sh")
    env = {**os.environ, "HOSTPY": sys.executable}
    bad = subprocess.run(["bash", script, "--windows", "many", str(birdnet_bundle.root)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--windows 'many'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    nob = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert nob.returncode == 2 and "has no manifest.json" in nob.stderr
    # --no-build with an empty cache: exit 3 (what the slow test skips on), nothing built; without
    # qemu the script stops before it even makes the cache folder
    empty = tmp_path / "cache"
    res = subprocess.run(["bash", script, "--no-build", "--cache", str(empty), "--out", str(tmp_path / "o"),
                          str(birdnet_bundle.root)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 3 and "no cache" in res.stderr
    assert not empty.exists() or not any(p.name.startswith("rootfs") for p in empty.iterdir())
