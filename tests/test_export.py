"""ONNX export: the kernel convolution as standard ops, the rebuilt forward, and onnxruntime against PyTorch."""
import sys

import numpy as np
import pytest
import torch

from lgc_fast import cli
from lgc_fast.checkpoint import save_checkpoint
from lgc_fast.export import (CHECK_TOLERANCE, KERNEL_FORMS, ExportableLGCN, KernelConv2d, check_equivalence,
                             export_onnx, face_probe, onnx_check, relative_error)
from lgc_fast.model import LGCN
from lgc_fast.ops.kernel_conv import kernel_conv_ref

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def tiny(variant: str = "release") -> LGCN:
    torch.manual_seed(0)
    return LGCN(variant, width=8, local_layers=(3, 5)).eval()


@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_kernel_conv_as_standard_ops_matches_the_reference(form):
    x = torch.randn((2, 3, 50, 61), generator=torch.Generator().manual_seed(0))
    assert relative_error(KernelConv2d(3, form)(x).numpy(), kernel_conv_ref(x).numpy()) < 1e-5


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_rebuilt_forward_matches_the_model(variant):
    model = tiny(variant)
    image = face_probe()
    assert check_equivalence(ExportableLGCN(model), model, image) < 1e-5
    with torch.no_grad():
        local, _ = ExportableLGCN(model)(image)
        expected, _ = model(image)
    assert relative_error(local.numpy(), expected.numpy()) < 1e-5


@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_exported_graph_runs_in_onnxruntime_like_pytorch(form, tmp_path):
    model = tiny()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, form, probe=face_probe())
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert {node.op_type for node in graph.graph.node} >= {"Conv", "Relu"}
    # The conv blocks' BatchNorm and 0.1 scale are folded into their convolutions: Mul only at the input and after
    # the release's two kernel convolutions (K * O_l and K * B).
    assert sum(node.op_type == "Mul" for node in graph.graph.node) <= 3
    assert not any(node.op_type == "BatchNormalization" for node in graph.graph.node)
    face = face_probe()
    wide = torch.nn.functional.interpolate(face, size=(120, 150), mode="bilinear").repeat(2, 1, 1, 1)
    images = [face, wide] if form == "separable" else [face]  # onnxruntime's dense 45x45 depthwise conv is slow
    assert onnx_check(path, model, images) < CHECK_TOLERANCE  # a real face; dynamic batch and spatial size


def test_a_channels_last_network_exports_as_standard_convolutions(tmp_path):
    """Its folded copy is channels_last too (LGCN.folded keeps the layout), and would hold layout copies and the
    planar heads' batched products; the export runs it planar, with F.conv2d whatever the GPU measured."""
    model = tiny().to(memory_format=torch.channels_last).use_conv_via("dgrad")
    path = tmp_path / "cl.onnx"
    export_onnx(model, path, probe=face_probe())
    graph = onnx.load(str(path))
    assert not {node.op_type for node in graph.graph.node} & {"ConvTranspose", "MatMul", "Transpose"}
    assert onnx_check(path, model, [face_probe()]) < CHECK_TOLERANCE


def test_export_command(tmp_path, capsys):
    model = tiny("paper")
    save_checkpoint(tmp_path / "w.pt", {"config": model.config, "model": model.state_dict()})
    code = cli.main(["export", "--onnx", str(tmp_path / "out" / "m.onnx"), "--weights", str(tmp_path / "w.pt")])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "out" / "m.onnx").is_file()
    assert "onnxruntime vs PyTorch" in out
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "m.onnx"]  # no temporary files left


def test_export_names_an_unusable_onnx_path_in_one_line(tmp_path, capsys):
    model = tiny()
    save_checkpoint(tmp_path / "w.pt", {"config": model.config, "model": model.state_dict()})
    (tmp_path / "taken").write_text("a file")
    for onnx, why in ((tmp_path / "taken" / "m.onnx", f"--onnx {tmp_path / 'taken'}: a file, not a folder"),
                      (tmp_path, f"--onnx {tmp_path}: a folder, not a file name")):
        code = cli.main(["export", "--onnx", str(onnx), "--weights", str(tmp_path / "w.pt")])
        err = capsys.readouterr().err
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1


def test_export_without_onnxruntime_skips_the_check(tmp_path, monkeypatch, capsys):
    model = tiny()
    save_checkpoint(tmp_path / "w.pt", {"config": model.config, "model": model.state_dict()})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert onnx_check(tmp_path / "none.onnx", model, [face_probe()]) is None
    code = cli.main(["export", "--onnx", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "w.pt")])
    assert code == 0 and "onnxruntime is not installed" in capsys.readouterr().out


def test_face_probe_is_a_face_crop():
    face = face_probe()
    assert face.shape == (1, 1, 96, 96) and 0 <= face.min() and face.max() <= 255
    assert float(face.std()) > 20  # a textured face, not a flat patch
    assert np.isfinite(face.numpy()).all()


@pytest.mark.parametrize("opset", [6, 21, 99])
def test_export_refuses_opsets_it_cannot_write_or_run(tmp_path, capsys, opset):
    """Opset 6 wrote a graph that onnxruntime then failed on with a traceback; 21 and above failed in the exporter
    (with a traceback after a dump of the whole graph) or were written with an 'unsupported' warning."""
    model = tiny()
    save_checkpoint(tmp_path / "w.pt", {"config": model.config, "model": model.state_dict()})
    code = cli.main(["export", "--onnx", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "w.pt"),
                     "--opset", str(opset)])
    err = capsys.readouterr().err
    assert code == 2 and "opset must be in 7..20" in err and f"got {opset}" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_network_whose_output_is_not_finite(tmp_path, capsys):
    """Finite weights that overflow: the checks compared NaN errors with '>', which let them pass (and onnxruntime's
    NaN error was reported as 0.0)."""
    broken = tiny()
    broken.local_features[0].bn.bias.data.fill_(3e38)
    broken.global_out.weight.data.fill_(3e38)  # the kernel convolution's 0.01 no longer overflows on its own
    save_checkpoint(tmp_path / "w.pt", {"config": broken.config, "model": broken.state_dict()})
    code = cli.main(["export", "--onnx", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "w.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "output is not finite (relative error nan)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
    export_onnx(tiny(), tmp_path / "fine.onnx", probe=face_probe())
    assert np.isnan(onnx_check(tmp_path / "fine.onnx", broken, [face_probe()]))


def test_export_keeps_the_earlier_file_when_onnxruntime_disagrees(tmp_path, capsys, monkeypatch):
    """The graph used to be written to --onnx before onnxruntime checked it: a failed check left it in place of the
    earlier file."""
    import lgc_fast.export as export_module

    model = tiny()
    save_checkpoint(tmp_path / "w.pt", {"config": model.config, "model": model.state_dict()})
    argv = ["export", "--onnx", str(tmp_path / "m.onnx"), "--weights", str(tmp_path / "w.pt")]
    assert cli.main(argv) == 0 and "wrote" in capsys.readouterr().out
    earlier = (tmp_path / "m.onnx").read_bytes()
    monkeypatch.setattr(export_module, "onnx_check", lambda *args: 1.0)
    assert cli.main(argv + ["--kernel", "dense"]) == 1
    assert "m.onnx was not written" in capsys.readouterr().err
    assert (tmp_path / "m.onnx").read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "w.pt"]
