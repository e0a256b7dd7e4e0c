"""Asynchronous checkpoint saving: staged state, same atomic protocol, same resume."""

import threading

import torch

from meshforge.pretrain import checkpoint_writer
from meshforge.pretrain.checkpoint import list_checkpoints, load_checkpoint
from meshforge.pretrain.checkpoint_writer import Checkpointer
from meshforge.pretrain.metrics import read_metrics
from parallel_harness import PARITY_ARGS, read_result, run_ranks


def _model_and_optim(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return model, opt


def test_async_save_writes_the_state_of_the_save_call(tmp_path, monkeypatch):
    model, opt = _model_and_optim(0)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    release, finalizers = threading.Event(), []
    real_finalize = Checkpointer._finalize

    def gated_finalize(self, *args):
        finalizers.append(threading.current_thread())
        release.wait(60)
        real_finalize(self, *args)

    monkeypatch.setattr(Checkpointer, "_finalize", gated_finalize)
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True)
    meta = {"note": "async"}
    ck.save(1, model, opt, meta)
    meta["note"] = "changed after the save call"
    ck.wait_staged()  # what the trainer's step does before its optimizer step
    # training goes on while the write runs: change every weight and optimizer moment in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["exp_avg"].mul_(-3.0)
    assert not ck.poll() and list_checkpoints(ck.root) == []  # not visible until finalized
    release.set()
    ck.wait()
    assert finalizers and finalizers[0] is not threading.main_thread()  # meta.json, rename, prune: off this thread
    assert [p.name for p in list_checkpoints(ck.root)] == ["step_00000001"]
    ((step, blocked),) = ck.completed()
    assert step == 1 and blocked > 0 and ck.completed() == []
    fresh, fresh_opt = _model_and_optim(1)
    meta = load_checkpoint(ck.root / "step_00000001", fresh, fresh_opt)
    assert meta["step"] == 1 and meta["note"] == "async"
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    for p, w in zip(fresh.parameters(), want_exp_avg):
        torch.testing.assert_close(fresh_opt.state[p]["exp_avg"], w, rtol=0, atol=0)
    ck.close()


def test_async_save_keeps_last_k_and_finishes_before_the_next(tmp_path):
    model, opt = _model_and_optim(0)
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True)
    for step in (1, 2, 3):
        ck.save(step, model, opt, {})
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    ck.close()
    assert [p.name for p in list_checkpoints(ck.root)] == ["step_00000002", "step_00000003"]
    assert not list(ck.root.glob("*.tmp"))


def test_wait_is_collective_whether_or_not_a_poll_saw_the_save_finish(tmp_path, monkeypatch):
    """A rank whose poll() already finalized the save still enters wait()'s barrier.

    Whether a future is done at a poll is timing, different on each rank; if it decided who
    enters the barrier, the ranks' collectives would pair up wrongly and the job would hang.
    """
    barriers = []
    monkeypatch.setattr(checkpoint_writer, "_barrier", lambda: barriers.append(1))
    model, opt = _model_and_optim(0)
    for polled in (True, False):
        ck = Checkpointer(tmp_path / str(polled), keep_last=2, async_save=True)
        ck.save(1, model, opt, {})
        if polled:
            ck._pending.future.result()
            assert ck.poll() and [p.name for p in list_checkpoints(ck.root)] == ["step_00000001"]
        barriers.clear()
        ck.wait()
        assert len(barriers) == 1, polled
        ck.wait()  # nothing in flight any more: no collective
        assert len(barriers) == 1, polled
        ck.close()


def test_blocked_seconds_count_the_save_call_and_every_poll_including_the_last(tmp_path, monkeypatch):
    """A clock that moves one second per reading: the save call, each poll that found the write running and
    the poll that found it complete each cost the training thread one second."""
    readings = iter(range(10**6))
    monkeypatch.setattr(checkpoint_writer, "time", type("Clock", (), {"perf_counter": lambda: float(next(readings))}))
    release = threading.Event()
    real_finalize = Checkpointer._finalize
    monkeypatch.setattr(Checkpointer, "_finalize", lambda self, *a: (release.wait(60), real_finalize(self, *a)))
    model, opt = _model_and_optim(0)
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True)
    ck.save(1, model, opt, {})
    polls = 0
    for _ in range(3):  # the write cannot finish: finalizing waits for release
        polls += 1
        assert not ck.poll()
    release.set()
    ck._pending.future.result()
    polls += 1
    assert ck.poll()
    assert ck.completed() == [(1, 1.0 + polls)]
    ck.close()


def test_async_checkpoints_resume_exactly_on_two_ranks(tiny_data, tmp_path):
    """fsdp2 on 2 ranks, async saves every 2 steps, stopped at 6 and resumed: the same run as synchronous saves."""

    def train(out, steps, *extra):
        run_ranks(
            2,
            [
                "train",
                *PARITY_ARGS,
                "--data.path",
                str(tiny_data),
                "--train.output_dir",
                str(out),
                "--checkpoint.interval",
                "2",
                "--train.steps",
                str(steps),
                *extra,
            ],
        )

    sync, asy = tmp_path / "sync", tmp_path / "async"
    train(sync, 10)
    train(asy, 6, "--checkpoint.async_save", "true")
    assert [p.name for p in list_checkpoints(asy / "checkpoints")] == ["step_00000004", "step_00000006"]
    train(asy, 10, "--checkpoint.async_save", "true")
    want, got = read_result(sync), read_result(asy)
    assert got.losses == want.losses  # bit-identical, step by step
    for name, p in want.params.items():
        torch.testing.assert_close(got.params[name], p, rtol=0, atol=0)
    blocked = [r["checkpoint_blocked_s"] for r in read_metrics(asy) if "checkpoint_blocked_s" in r]
    assert len(blocked) == 5 and all(b >= 0 for b in blocked)
