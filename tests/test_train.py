"""``lgc-fast train``: learning on real faces, exact resume, two-process DDP, bad data, run-folder safety,
background (non-face) samples and --init."""
import csv
import faulthandler
import io
import json
import os
import signal
import socket
import time

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import lgc_fast.train as train_module
from lgc_fast.checkpoint import export_weights, load_checkpoint, load_model, save_checkpoint
from lgc_fast.cli import main
from lgc_fast.data import write_pts
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN
from lgc_fast.ops.bn_relu_dropout import fused_backend
from lgc_fast.train import compiled_forward_loss, learning_rate, parse_args, train, train_step

TINY = ["--width", "4", "--local-layers", "3", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--log-every", "2"]


def synthetic_faces(folder, n=12, size=64, seed=0):
    """n random grey images, each with a jittered 68-point cloud, one person per image (under pytest's tmp_path)."""
    rng = np.random.default_rng(seed)
    template = rng.uniform(16, 48, size=(68, 2))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"Person_{i}_00.png"), rng.integers(0, 256, (size, size), dtype=np.uint8))
        write_pts(folder / f"Person_{i}_00.pts", template + rng.normal(0, 1, (68, 2)))
    return folder


def test_learning_rate_steps():
    assert [learning_rate(1e-3, e, 100) for e in (0, 49, 50, 74, 75, 89, 90, 99)] == pytest.approx(
        [1e-3, 1e-3, 2e-4, 2e-4, 1e-4, 1e-4, 2e-5, 2e-5])
    assert [learning_rate(1.0, e, 4) for e in range(4)] == pytest.approx([1.0, 1.0, 0.2, 0.1])
    assert learning_rate(1.0, 0, 1) == 1.0 and learning_rate(1.0, 1, 2) == 0.2


def test_autocast_defaults_on_for_cuda_and_for_a_cpu_with_hardware_bfloat16(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(train_module, "native_bf16_cpu", lambda native=native: (native, "patched"))
        for argv, device, want in (([], "cpu", native), ([], "cuda", True), (["--no-amp"], "cpu", False),
                                   (["--no-amp"], "cuda", False), (["--amp"], "cpu", True)):
            args = parse_args(["--data", "d", "--out", "o", *argv])
            assert train_module._settings(args, 1, torch.device(device))["amp"] is want, (native, argv, device)


def test_compiled_loss_matches_eager(one_thread):
    """--compile: the forward pass and loss under torch.compile (inductor) give eager's loss, gradients and BatchNorm
    running statistics, also after an SGD step has changed the weights. In float64: inductor's BatchNorm backward sums
    in the input's precision where the CPU's eager kernel sums in double, which in float32 differs by up to ~1 % of a
    gradient that mostly cancels. No dropout, so neither draws anything random."""
    torch.manual_seed(0)
    eager_net = LGCN("release", 4, 68, 0.0, [3]).double().train()
    compiled_net = LGCN("release", 4, 68, 0.0, [3]).double().train()
    compiled = compiled_forward_loss("default")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        compiled_net.load_state_dict(eager_net.state_dict())
        images = torch.rand(2, 1, 24, 24, generator=g, dtype=torch.float64) * 255
        points = torch.rand(2, 68, 2, generator=g) * 14 + 5
        labelled = torch.rand(2, 68, generator=g) > 0.1
        losses = []
        for net, loss_fn in ((eager_net, train_module.forward_loss), (compiled_net, compiled)):
            net.zero_grad()
            losses.append(loss_fn(net, images, points, labelled, False))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)
        for (name, a), b in zip(eager_net.named_parameters(), compiled_net.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-9 * float(a.grad.abs().max()), msg=name)
        for (name, a), b in zip(eager_net.named_buffers(), compiled_net.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
        optimizer = train_module._make_optimizer(eager_net.parameters(), 1e-2, 0.9)
        train_step(eager_net, optimizer, images, points, labelled, False, 100.0)  # new weights for the next round


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation concerns CUDA steps")
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_a_cuda_training_step_never_waits_for_the_device(fused):
    """train_step as lgc-fast train runs it on a GPU (bf16 autocast, channels_last, with and without the fused
    epilogues) queues its work without one host synchronisation, so the host runs ahead of the device."""
    torch.manual_seed(0)
    net = LGCN("release", 8).cuda().to(memory_format=torch.channels_last).train().fuse_epilogues(fused)
    optimizer = train_module._make_optimizer(net.parameters(), 1e-3, 0.9)
    images = (torch.rand(4, 1, 96, 96, device="cuda") * 255).contiguous(memory_format=torch.channels_last)
    points = torch.rand(4, 68, 2, device="cuda") * 58 + 19
    labelled = torch.ones(4, 68, dtype=torch.bool, device="cuda")
    for _ in range(2):  # first steps: cuDNN's choices, lazy initialisation
        train_step(net, optimizer, images, points, labelled, True, 100.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = train_step(net, optimizer, images, points, labelled, True, 100.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_compile_mode_is_checked_and_recorded(tmp_path, capsys):
    assert parse_args(["--data", "d", "--out", "o", "--compile"]).compile == "default"
    assert parse_args(["--data", "d", "--out", "o", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse_args(["--data", "d", "--out", "o"]).compile is None
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data", "d", "--out", "o", "--compile", "fastest"])
    assert exit_info.value.code == 2 and "--compile: invalid choice: 'fastest'" in capsys.readouterr().err


def test_compiled_bf16_step_on_the_cpu_has_finite_gradients(one_thread):
    """--compile with bfloat16 autocast on the CPU: inductor makes convolutions channels_last, where torch's bfloat16
    weight gradient of the first global layer (136 input channels, dilation 4) comes out NaN or wrong; the network
    runs that layer as lgc_fast's dilated_conv. Its gradient must be as near float32's as eager bfloat16's is (this
    narrow random network's bfloat16 gradients are 4-15 % from float32's in every layer, eager or compiled)."""
    torch.manual_seed(0)
    nets = [LGCN("release", 8, 68, 0.0, [3]).train() for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 32, 32, generator=g) * 255
    points, labelled = torch.rand(2, 68, 2, generator=g) * 20 + 6, torch.ones(2, 68, dtype=torch.bool)
    eager_loss = train_module.forward_loss
    runs = ((eager_loss, False), (eager_loss, True), (compiled_forward_loss("default"), True))
    for net, (loss_fn, amp) in zip(nets, runs):
        loss_fn(net, images, points, labelled, amp).backward()
    float32, eager, compiled = (net.global_features[0].conv.weight.grad for net in nets)
    assert compiled.isfinite().all()
    eager_error = ((eager - float32).norm() / float32.norm()).item()
    assert ((compiled - float32).norm() / float32.norm()).item() < 1.5 * eager_error


def test_training_lowers_validation_error(trainset_dir, tmp_path, one_thread):
    """A small network on 59 training and 21 validation faces (different people) of the real trainset."""
    out = tmp_path / "run"
    args = parse_args(["--data", trainset_dir, "--out", out, "--limit", 80, "--val-fraction", 0.2, "--epochs", 16,
                       "--batch-size", 8, "--width", 16, "--local-layers", "5,3,3,3", "--image-size", 48,
                       "--lr", 1e-2, "--clip-norm", 10, "--no-augment", "--workers", 0, "--log-every", 7])
    result = train(args)
    nmes = [row["val_nme"] for row in result.history]
    assert len(nmes) == 16 and result.step == 16 * 7  # 59 training faces, batch 8
    assert min(nmes) < 0.7 * nmes[0], nmes
    assert result.history[-1]["train_loss"] < 0.8 * result.history[0]["train_loss"]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_nme"]) for r in rows] == pytest.approx(nmes)
    assert [float(r["lr"]) for r in rows] == pytest.approx([learning_rate(1e-2, e, 16) for e in range(16)])
    log = json.loads((out / "log.json").read_text())
    assert log["settings"]["limit"] == 80 and len(log["epochs"]) == 16
    best = load_checkpoint(out / "best.pt")
    assert best["best_nme"] == pytest.approx(min(nmes)) and best["image_size"] == 48
    assert best["epoch"] == 1 + nmes.index(min(nmes))
    assert load_model(out / "best.pt").width == 16


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_resume_after_interruptions_is_bit_exact(tmp_path, monkeypatch):
    """Stopped by --max-steps inside epoch 2, then by SIGINT inside epoch 3, and resumed each time: the weights,
    optimiser state and log equal those of an uninterrupted run (augmentation, dropout and a DataLoader worker on;
    --deterministic, which a GPU needs for this)."""
    data = synthetic_faces(tmp_path / "faces", n=14)
    common = ["--data", data, "--epochs", 3, "--val-fraction", 0.1, "--seed", 3, *TINY, "--workers", 1,
              "--deterministic"]
    straight = train(parse_args(common + ["--out", tmp_path / "a"]))
    assert straight.finished and straight.step == 3 * 3  # 12 training faces, batch 4
    first = train(parse_args(common + ["--out", tmp_path / "b", "--max-steps", 5]))
    assert not first.finished and first.step == 5
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (1, 5, 2)

    calls = []

    def step_then_signal(*args, **kwargs):  # SIGINT to this process during the run's third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_then_signal)
    second = train(parse_args(common + ["--out", tmp_path / "b", "--resume"]))
    monkeypatch.undo()
    assert second.interrupted and not second.finished and second.step == 8
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (2, 8, 2)
    resumed = train(parse_args(common + ["--out", tmp_path / "b", "--resume"]))
    assert resumed.finished and resumed.step == straight.step
    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("train_loss", "val_nme", "lr", "step"):
        assert [r[key] for r in straight.history] == [r[key] for r in resumed.history]
    opt_a = load_checkpoint(tmp_path / "a" / "last.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "b" / "last.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)


def test_resume_keeps_the_numeric_options_it_is_not_given(tmp_path, monkeypatch, one_thread):
    """A run started with non-default numeric options resumes with them when the command line leaves them out (so a
    later change of their defaults cannot alter a resumed run); an option given anew replaces the saved one."""
    data = synthetic_faces(tmp_path / "faces", n=10)
    common = ["--data", data, "--out", tmp_path / "run", "--epochs", 2, "--val-fraction", 0.2, *TINY]
    chosen = {"amp": True, "channels_last": True, "fused_epilogue": False}
    train(parse_args(common + ["--amp", "--channels-last", "--no-fused-epilogue", "--max-steps", 1]))
    log = io.StringIO()
    progress = train_module.Progress
    monkeypatch.setattr(train_module, "Progress", lambda enabled: progress(enabled, log))
    train(parse_args(common + ["--resume", "--max-steps", 2]))
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert {k: settings[k] for k in chosen} == chosen
    assert "resumed from" in log.getvalue() and "resuming with different" not in log.getvalue()
    train(parse_args(common + ["--resume", "--no-amp"]))
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert {k: settings[k] for k in chosen} == {**chosen, "amp": False}
    assert "note: resuming with different amp;" in log.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, out_dir):
    # A rank still running after 240 s prints where every thread of it is (to the test's captured stderr) and exits.
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(parse_args(argv))
    torch.save(_weights(result.model), os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    data = synthetic_faces(tmp_path / "faces", n=20)
    run = tmp_path / "run"
    argv = [str(a) for a in ["--data", data, "--out", run, "--epochs", 2, "--val-fraction", 0.2, "--device", "cpu",
                             *TINY]]
    workers = mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=False)
    # Once on torch 2.4.1 rank 1 stayed blocked after rank 0 had finished, and join=True waited for ever: fail instead.
    limit_s = 300
    deadline = time.monotonic() + limit_s
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            alive = [rank for rank, process in enumerate(workers.processes) if process.is_alive()]
            for process in workers.processes:
                process.kill()
            pytest.fail(f"DDP ranks {alive} still running {limit_s} s after the start (written: "
                        f"{sorted(p.name for p in tmp_path.glob('rank*.pt'))})")
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    state = load_checkpoint(run / "last.pt")
    # 16 training faces, 2 processes x batch 4 -> 2 steps per epoch; the checkpoint holds both ranks' RNG states.
    assert state["step"] == 4 and len(state["rng"]) == 2 and state["settings"]["world_size"] == 2
    assert all(torch.equal(state["model"][k], w0[k]) for k in w0)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "log.csv", "log.json", "settings.json"]


def test_bad_data_is_named_and_skipped_or_stops(tmp_path, capsys):
    data = synthetic_faces(tmp_path / "faces", n=10)
    (data / "Person_3_00.png").write_bytes(b"\xff\xd8 truncated jpeg")
    (data / "Person_5_00.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n3 4\n}\n")
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--val-fraction", "0.2",
            *[str(a) for a in TINY]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Person_3_00.png: cannot read" in err and "Person_5_00.pts" in err
    assert len((run / "data_problems.txt").read_text().splitlines()) == 2
    before = (run / "last.pt").read_bytes()
    # --on-bad-data stop: the run stops naming the file and leaves the existing checkpoint untouched.
    assert main(argv + ["--resume", "--epochs", "2", "--on-bad-data", "stop"]) == 2
    assert "Person_5_00.pts" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before
    fresh = tmp_path / "fresh"
    (data / "Person_5_00.pts").unlink()
    (data / "Person_5_00.png").unlink()
    assert main(argv[:4] + [str(fresh)] + argv[5:] + ["--on-bad-data", "stop"]) == 2
    assert "Person_3_00.png: cannot read" in capsys.readouterr().err
    assert not (fresh / "last.pt").exists()


def test_run_folder_is_protected(tmp_path, capsys):
    data = synthetic_faces(tmp_path / "faces", n=10)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--val-fraction", "0.2",
            *[str(a) for a in TINY]]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(argv + ["--resume", "--batch-size", "2"]) == 2
    assert "batch_size: 4 -> 2" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # nothing left to do: 1 of 1 epochs done
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_synthetic_backgrounds_train_and_resume_bit_exact(tmp_path, one_thread):
    """A quarter of the samples are backgrounds (12 faces + 4 per epoch); stopped by --max-steps inside epoch 2 and
    resumed, the run ends with the weights and log of an uninterrupted one (a DataLoader worker on, --deterministic)."""
    data = synthetic_faces(tmp_path / "faces", n=14)
    common = ["--data", data, "--epochs", 2, "--val-fraction", 0.1, "--seed", 1, "--backgrounds", "synthetic",
              "--background-fraction", 0.25, *TINY, "--workers", 1, "--deterministic"]
    straight = train(parse_args(common + ["--out", tmp_path / "a"]))
    assert straight.finished and straight.step == 2 * 4  # 16 samples per epoch, batch 4
    first = train(parse_args(common + ["--out", tmp_path / "b", "--max-steps", 5]))
    assert not first.finished and first.step == 5
    other_fraction = [a if a != 0.25 else 0.5 for a in common]
    with pytest.raises(LgcError, match=r"background_fraction: 0.25 -> 0.5"):
        train(parse_args(other_fraction + ["--out", tmp_path / "b", "--resume"]))
    resumed = train(parse_args(common + ["--out", tmp_path / "b", "--resume"]))
    assert resumed.finished and resumed.step == straight.step
    a, b = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    settings = load_checkpoint(tmp_path / "b" / "last.pt")["settings"]
    assert (settings["backgrounds"], settings["background_fraction"]) == ("synthetic", 0.25)


def test_folder_backgrounds_name_and_skip_a_corrupt_file(tmp_path, capsys, one_thread):
    data = synthetic_faces(tmp_path / "faces", n=10)
    folder = tmp_path / "backgrounds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"scene{i}.jpg"), rng.integers(0, 256, (50 + 20 * i, 70), dtype=np.uint8))
    (folder / "scene_broken.png").write_bytes(b"\x89PNG truncated")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--val-fraction", "0.2",
            "--backgrounds", str(folder), "--background-fraction", "0.5", *[str(a) for a in TINY]]
    assert main(argv) == 0
    assert "scene_broken.png: cannot read or decode the image" in capsys.readouterr().err
    assert (tmp_path / "run" / "data_problems.txt").read_text().count("scene_broken.png") == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4  # 8 training faces + 8 backgrounds, batch 4
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["backgrounds"] == str(folder.resolve()) and settings["background_fraction"] == 0.5
    default = parse_args(argv[1:-len(TINY) - 2])
    assert train_module._settings(default, 1, torch.device("cpu"))["background_fraction"] == 0.1
    assert main(argv[:4] + [str(tmp_path / "stop")] + argv[5:] + ["--on-bad-data", "stop"]) == 2
    assert "scene_broken.png: cannot read" in capsys.readouterr().err
    assert main(argv[:4] + [str(tmp_path / "x")] + argv[5:9] + ["--background-fraction", "0.2"]) == 2
    assert "--background-fraction needs --backgrounds" in capsys.readouterr().err


def test_init_starts_a_new_run_from_weights_of_the_same_architecture(tmp_path, monkeypatch, capsys, one_thread):
    data = synthetic_faces(tmp_path / "faces", n=10)
    torch.manual_seed(5)
    source = LGCN("release", 4, 68, 0.1, [3])
    save_checkpoint(tmp_path / "source.pt", {"config": source.config, "model": source.state_dict()})
    export_weights(tmp_path / "source.pt", tmp_path / "exported.pt", half=True)
    started = []

    def record_then_step(net, *args, **kwargs):  # the weights the first step starts from
        if not started:
            started.append(_weights(net))
        return train_step(net, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", record_then_step)
    common = ["--data", data, "--epochs", 1, "--val-fraction", 0.2, *TINY]
    result = train(parse_args(common + ["--out", tmp_path / "run", "--init", tmp_path / "exported.pt",
                                        "--max-steps", 1]))
    want = source.state_dict()
    assert result.step == 1 and started[0].keys() == want.keys()
    assert all(torch.equal(started[0][k], want[k].half().to(want[k].dtype) if want[k].is_floating_point()
                           else want[k]) for k in want)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["settings"]["init"] == str((tmp_path / "exported.pt").resolve())
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (0, 1, 1)  # a new run, not a continuation
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["init"] == state["settings"]["init"]
    monkeypatch.undo()
    train(parse_args(common + ["--out", tmp_path / "run", "--resume"]))  # the resumed run keeps its origin
    assert json.loads((tmp_path / "run" / "log.json").read_text())["settings"]["init"] == state["settings"]["init"]

    argv = ["train", *[str(a) for a in common], "--out", str(tmp_path / "other"), "--init"]
    assert main(argv + [str(tmp_path / "source.pt"), "--width", "8"]) == 2
    err = capsys.readouterr().err
    assert "another architecture: width 4 (here 8)" in err and len(err.strip().splitlines()) == 1
    assert main(argv + [str(tmp_path / "source.pt"), "--local-layers", "3,3"]) == 2
    assert "local_layers [3] (here [3, 3])" in capsys.readouterr().err
    assert main(argv + [str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert main(argv + [str(tmp_path / "source.pt"), "--resume"]) == 2
    assert "pass only one of them" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_signal_to_the_process_group_saves_the_run(tmp_path):
    """SIGTERM to the whole process group (workers included: a scheduler, `kill -- -PGID`) mid-run: the trainer
    saves last.pt and exits 130 with a one-line message, instead of dying of its killed DataLoader worker."""
    import subprocess
    import sys
    import time

    data = synthetic_faces(tmp_path / "faces", n=24)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lgc_fast.cli", "train", "--data", str(data), "--out", str(out), "--epochs", "100",
            *TINY, "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: the signal reaches nothing else
    deadline = time.monotonic() + 120
    while not (out / "log.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch is done: the run is inside a later one
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    state = load_checkpoint(out / "last.pt")
    assert state["step"] > 0 and (state["epoch"], state["batch_in_epoch"]) != (0, 0)


def test_fused_epilogue_default_is_on_where_compiled_kernels_were_measured_faster(monkeypatch):
    """C++ on the CPU at any batch size; CUDA C++ from FUSED_EPILOGUE_MIN_CUDA_BATCH faces a step (a tie at 16);
    never Triton alone."""
    args = parse_args(["--data", "d", "--out", "o"])
    cpu = torch.device("cpu")
    assert args.batch_size < train_module.FUSED_EPILOGUE_MIN_CUDA_BATCH
    assert train_module._settings(args, 1, cpu)["fused_epilogue"] is (fused_backend(cpu) == "cpu")
    big = parse_args(["--data", "d", "--out", "o", "--batch-size", str(train_module.FUSED_EPILOGUE_MIN_CUDA_BATCH)])
    for backend, on_small, on_big in (("cuda", False, True), ("cpu", True, True), ("triton", False, False),
                                      (None, False, False)):
        monkeypatch.setattr(train_module, "fused_backend", lambda device, backend=backend: backend)
        assert train_module._settings(args, 1, torch.device("cuda"))["fused_epilogue"] is on_small, backend
        assert train_module._settings(big, 1, torch.device("cuda"))["fused_epilogue"] is on_big, backend
    args.fused_epilogue = False
    assert train_module._settings(args, 1, cpu)["fused_epilogue"] is False


def test_fused_epilogue_trains_and_is_recorded(tmp_path, monkeypatch, one_thread):
    # The fused path runs the op's C++ kernels here, or its reference where the extension is not built (the kernels
    # inside the model against the modules: tests/test_model.py).
    import lgc_fast.model as model_module
    calls = []

    def counted(name):
        real_op = getattr(model_module, name)

        def op(*args, **kwargs):
            calls.append(name if name == "bn_relu_dropout_drawn" else (name, kwargs["training"]))
            return real_op(*args, **kwargs)
        return op

    backend = fused_backend(torch.device("cpu")) or "ref"
    monkeypatch.setattr(model_module, "fused_backend", lambda device: backend)
    for name in ("bn_relu_dropout", "bn_relu_dropout_drawn"):
        monkeypatch.setattr(model_module, name, counted(name))
    assert parse_args(["--data", "d", "--out", "o"]).fused_epilogue is None  # automatic: on for the CPU's kernels
    data = synthetic_faces(tmp_path / "faces", n=10)
    result = train(parse_args(["--data", data, "--out", tmp_path / "run", "--epochs", 1, "--val-fraction", 0.2,
                               "--max-steps", 2, "--fused-epilogue", "--device", "cpu", *TINY]))
    assert result.step == 2 and all(np.isfinite(r["train_loss"]) for r in result.history)
    blocks = [m for m in result.model.modules() if hasattr(m, "fused_epilogue")]
    assert blocks and all(m.fused_epilogue for m in blocks)
    assert all(int(m.bn.num_batches_tracked) == 2 for m in blocks)
    # Two training steps, each block drawing its keep bits in the op; validation runs the folded network
    # (lgc_fast.evaluate.predict), which has no BatchNorm left.
    assert calls == ["bn_relu_dropout_drawn"] * (2 * len(blocks))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["settings"]["fused_epilogue"] is True


def _signalled_while_starting(worker_id):
    os.kill(os.getpid(), signal.SIGTERM)  # a signal to the process group, arriving before the worker's init ran
    train_module.leave_stop_signals_to_the_trainer(worker_id)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks")
def test_a_stop_signal_while_workers_start_kills_no_worker():
    from torch.utils.data import DataLoader
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=_signalled_while_starting)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert [b.tolist() for b in train_module.start_workers(loader)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # this process's mask is back as it was


def test_resume_from_another_run_does_not_overwrite_the_run_in_out(tmp_path, capsys, one_thread):
    """--resume with a checkpoint from elsewhere used to continue it in an --out that held another run, replacing
    that run's last.pt, best.pt and logs."""
    data = synthetic_faces(tmp_path / "faces", n=10)
    common = ["train", "--data", str(data), "--epochs", "2", "--val-fraction", "0.2", "--max-steps", "1",
              *[str(a) for a in TINY]]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    capsys.readouterr()
    before = (tmp_path / "b" / "last.pt").read_bytes()
    assert main(common + ["--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "last.pt"),
                          "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b'} already holds a run (last.pt)" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "last.pt").read_bytes() == before
    # Its own checkpoints continue it; another run's continue in a fresh folder.
    assert main(common + ["--out", str(tmp_path / "b"), "--seed", "1", "--resume", str(tmp_path / "b" / "last.pt"),
                          "--max-steps", "2"]) == 0
    assert main(common + ["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "a" / "last.pt"),
                          "--max-steps", "2"]) == 0
    assert load_checkpoint(tmp_path / "c" / "last.pt")["step"] == 2


def test_negative_workers_are_refused_before_the_run_folder_is_made(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--workers", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--workers must be >= 0, got -1" in err and not (tmp_path / "run").exists()


def test_deterministic_option_is_recorded_and_kept_on_resume(tmp_path, one_thread):
    """--deterministic: convolutions on the forward kernels (no timed choice of family), the setting recorded and, not
    given again, kept by --resume; without it a network keeps same_conv2d's automatic choice."""
    data = synthetic_faces(tmp_path / "faces", n=10)
    common = ["--data", data, "--epochs", 1, "--val-fraction", 0.2, "--device", "cpu", *TINY]
    plain = train(parse_args(common + ["--out", tmp_path / "plain", "--max-steps", 1]))
    assert plain.model.conv_via == "auto"
    result = train(parse_args(common + ["--out", tmp_path / "run", "--max-steps", 1, "--deterministic"]))
    assert result.model.conv_via == "fprop"
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["settings"]["deterministic"] is True
    resumed = train(parse_args(common + ["--out", tmp_path / "run", "--max-steps", 2, "--resume"]))
    assert resumed.step == 2 and resumed.model.conv_via == "fprop"


def _watch_run_blocks(monkeypatch) -> list:
    """Record (conv_stacks, graphs) of every run_blocks call the model makes."""
    import lgc_fast.model as model_module
    seen = []
    real = model_module.run_blocks

    def watched(blocks, x, stacks=False, cudnn_plans=1, graphs="cudnn"):
        seen.append((stacks, graphs))
        return real(blocks, x, stacks, cudnn_plans, graphs)

    monkeypatch.setattr(model_module, "run_blocks", watched)
    return seen


def test_conv_stacks_option_parses_its_pieces():
    base = ["--data", "d", "--out", "o"]
    assert parse_args(base).conv_stacks is None
    assert parse_args(base + ["--conv-stacks"]).conv_stacks == "cudnn"
    assert parse_args(base + ["--conv-stacks", "triton"]).conv_stacks == "triton"
    assert parse_args(base + ["--conv-stacks", "triton", "--no-conv-stacks"]).conv_stacks is False
    with pytest.raises(SystemExit):
        parse_args(base + ["--conv-stacks", "tensorrt"])


def test_conv_stacks_option_trains_and_is_recorded(tmp_path, monkeypatch, one_thread):
    """--conv-stacks: the model runs its conv blocks through run_blocks with stacks on (on the CPU they find no cuDNN
    graphs and run as modules); the setting is recorded, a run that never had it resumes without a note, and so does
    one recorded before the option named its pieces (True: cuDNN's)."""
    seen = _watch_run_blocks(monkeypatch)
    data = synthetic_faces(tmp_path / "faces", n=10)
    common = ["--data", data, "--out", tmp_path / "run", "--epochs", 2, "--val-fraction", 0.2, "--device", "cpu",
              *TINY]
    result = train(parse_args(common + ["--max-steps", 1, "--conv-stacks"]))
    # the training step's local and global subnets (validation runs a folded copy, which has no stacks)
    assert result.step == 1 and result.model.conv_stacks and seen[:2] == [(True, "cudnn")] * 2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["settings"]["conv_stacks"] == "cudnn"
    seen.clear()
    resumed = train(parse_args(common + ["--max-steps", 2, "--resume"]))  # not given: the run's own setting
    assert resumed.step == 2 and resumed.model.conv_stacks and seen[:2] == [(True, "cudnn")] * 2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    state["settings"]["conv_stacks"] = True  # as runs before PIECES recorded it
    torch.save(state, tmp_path / "run" / "last.pt")
    seen.clear()
    log = io.StringIO()
    progress = train_module.Progress
    monkeypatch.setattr(train_module, "Progress", lambda enabled: progress(enabled, log))
    again = train(parse_args(common + ["--max-steps", 3, "--resume"]))
    assert again.step == 3 and seen[:2] == [(True, "cudnn")] * 2
    assert "resumed from" in log.getvalue() and "resuming with different" not in log.getvalue()
    seen.clear()
    off = train(parse_args(common + ["--max-steps", 4, "--resume", "--no-conv-stacks"]))
    assert off.step == 4 and not off.model.conv_stacks and seen[:2] == [(False, "cudnn")] * 2
    assert "note: resuming with different conv_stacks;" in log.getvalue()


def test_conv_stacks_on_the_triton_pieces_train(tmp_path, monkeypatch, one_thread):
    """--conv-stacks triton: the blocks run as conv_stack on lgc_fast's Triton kernels (in the interpreter here), the
    1-channel first block as its module; the step trains to a finite loss and the setting is recorded."""
    import sys

    from conftest import triton_backends
    from lgc_fast import backends
    from lgc_fast.kernels.fused_conv import TensorDescriptor

    if TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors (Triton 3.4 or later), which the Triton pieces need")
    if not triton_backends("cpu"):
        pytest.skip("the Triton pieces do not run here: " + backends()["triton"][1])
    seen = _watch_run_blocks(monkeypatch)
    pieces = []
    conv_stack_module = sys.modules["lgc_fast.ops.conv_stack"]
    real = conv_stack_module.stack_graphs
    monkeypatch.setattr(conv_stack_module, "stack_graphs",
                        lambda *args: pieces.append(type(real(*args)).__name__) or real(*args))
    data = synthetic_faces(tmp_path / "faces", n=6)
    args = ["--data", data, "--out", tmp_path / "run", "--epochs", 1, "--val-fraction", 0.2, "--device", "cpu",
            "--no-amp", *TINY, "--image-size", 16, "--batch-size", 2, "--max-steps", 1, "--conv-stacks", "triton"]
    parsed = parse_args(args)
    torch.manual_seed(parsed.seed)  # the run's initial weights
    initial = LGCN(parsed.variant, parsed.width, 68, parsed.dropout, parsed.local_layers).state_dict()
    result = train(parsed)
    assert result.step == 1 and seen[:2] == [(True, "triton")] * 2
    assert pieces and set(pieces) == {"TritonGraphs"}
    trained = result.model.state_dict()
    assert all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point())
    convs = [k for k in initial if k.endswith("conv.weight")]
    assert convs and all(not torch.equal(initial[k], trained[k]) for k in convs)  # every conv block learned
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["settings"]["conv_stacks"] == "triton"
