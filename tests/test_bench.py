"""The benchmark harness: registry rules, byte models, and a tiny end-to-end run.

No timing thresholds anywhere: only that every number exists, is finite and positive, and
that ratios are computed against the right reference.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optlab
from experiments.bench import (
    SGD_NAME,
    BenchEntry,
    BenchGoal,
    Registry,
    entries,
    get_entry,
    goals,
    main,
)
from experiments.bench.bandwidth import add_in_place, measure_bandwidth
from experiments.bench.cli import QUICK, parse_args, select_entries
from experiments.bench.report import evaluate_goals
from experiments.bench.timing import interleaved_times
from experiments.bench.trees import model_like_shapes, model_like_tree, tree_nbytes
from experiments.bench.updates import bench_updates, make_update_fn
from experiments.models import param_count

_TINY = [
    "--comm-workers",
    "0",
    "--study-seeds",
    "2",
    "--study-steps",
    "20",
    "--sizes",
    "1000",
    "--reps",
    "2",
    "--copy-mib",
    "4",
    "--copy-reps",
    "2",
    "--models",
    "mlp",
    "--train-reps",
    "2",
    "--steps-per-rep",
    "1",
]


def _positive_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _entry(name: str, **kwargs) -> BenchEntry:
    return BenchEntry(name=name, make=lambda: optax.sgd(0.1), bytes_per_param=8.0, **kwargs)


# --- end to end -------------------------------------------------------------------------


def test_main_quick_tiny_writes_every_entry(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--quick", "--out", str(out), *_TINY]) == 0
    result = json.loads(out.read_text())
    names = [e.name for e in entries()]

    assert {"jax_version", "backend", "device_kind", "cpu_count"} <= set(result["machine"])
    assert _positive_finite(result["bandwidth_gbs"])
    assert result["config"]["sizes"] == [1000]

    updates = result["updates"]
    assert [r["name"] for r in updates] == names
    for r in updates:
        for key in ("time_s", "gbs", "fraction_of_bandwidth", "ratio_to_sgd", "bytes_per_param"):
            assert _positive_finite(r[key]), (r["name"], key, r[key])
        assert r["num_params"] == param_count(model_like_tree(1000, np.random.default_rng(0)))
        assert r["state_bytes"] >= 0
        assert r["state_bytes_per_param"] == pytest.approx(r["state_bytes"] / r["num_params"])
        assert len(r["times_s"]) == 2
        if r["counterpart"] is None:
            assert r["ratio_to_counterpart"] is None
        else:
            assert _positive_finite(r["ratio_to_counterpart"])
    sgd_row = next(r for r in updates if r["name"] == SGD_NAME)
    assert sgd_row["ratio_to_sgd"] == 1.0
    assert sgd_row["state_bytes"] == 0

    (study,) = result["study_overhead"]
    assert study["seeds"] == 2
    assert study["steps"] == 20
    for key in ("compute_s", "cold_s", "warm_s"):
        assert _positive_finite(study[key]), key
    assert study["warm_ratio"] == pytest.approx(study["warm_s"] / study["compute_s"])

    train = result["train_steps"]
    # Entries with their own params tree (optax.lookahead) are measured in updates only.
    train_names = [e.name for e in entries() if e.make_params is None]
    assert "optax.lookahead(k=5,a=.5)" in names
    assert "optax.lookahead(k=5,a=.5)" not in train_names
    assert [(r["model"], r["name"]) for r in train] == [("mlp", n) for n in train_names]
    for r in train:
        assert _positive_finite(r["step_time_s"])
        assert _positive_finite(r["ratio_to_sgd"])
    assert next(r for r in train if r["name"] == SGD_NAME)["ratio_to_sgd"] == 1.0

    table = capsys.readouterr().out
    assert "Memory bandwidth" in table
    assert "Study wall time vs training compute" in table
    assert all(name in table for name in names)

    # Every registered goal has a row per size or model where both entries ran.
    assert {g["goal"] for g in result["goals"]} == {g.name for g in goals()}
    for g in result["goals"]:
        assert _positive_finite(g["ratio"])
        assert _positive_finite(g["mean_ratio"])
        assert g["met"] == (g["ratio"] <= g["max_ratio"])
    assert "Goals:" in table
    assert all(g.name in table for g in goals())


def test_main_only_selects_entries_with_sgd_and_counterparts(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--quick", "--out", str(out), "--only", "multilayer.*x2", *_TINY]) == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["updates"]] == [
        SGD_NAME,
        "optax.lookahead nested x2",
        "optlab.multilayer_lookahead x2",
    ]
    # Only the goal whose two entries both ran is reported.
    assert [g["goal"] for g in result["goals"]] == ["multilayer x2 / optax nested x2"]
    assert main(["--only", "no-such-entry", "--out", str(out)]) == 2
    assert "matches no entry" in capsys.readouterr().err


def test_select_entries_keeps_order_and_rejects_bad_patterns():
    all_entries = entries()
    assert select_entries(all_entries, None) == all_entries
    picked = select_entries(all_entries, ["^optax.adam$"])
    assert [e.name for e in picked] == [SGD_NAME, "optax.adam"]
    with pytest.raises(ValueError, match="invalid regular expression"):
        select_entries(all_entries, ["("])


def test_parse_args_quick_and_overrides():
    cfg, out = parse_args(["--quick"])
    assert cfg == QUICK
    assert out == "bench.json"
    assert cfg.sizes == (1_000_000,)
    full, _ = parse_args([])
    assert full.sizes == (1_000_000, 10_000_000)
    assert full.models == ("mlp", "cnn")
    cfg, _ = parse_args(["--sizes", "1M", "2.5k", "300", "--models", "--update-steps", "1"])
    assert cfg.sizes == (1_000_000, 2_500, 300)
    assert cfg.models == ()
    assert cfg.update_steps_per_rep == 1
    assert full.update_steps_per_rep == QUICK.update_steps_per_rep == 5
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "0"])


# --- registry ---------------------------------------------------------------------------


def test_registry_rejects_duplicate_names():
    registry = Registry()
    registry.register(_entry("a"))
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register(_entry("a"))


def test_registry_counterpart_must_be_registered_first():
    registry = Registry()
    with pytest.raises(ValueError, match=r"counterpart 'b'.*not registered"):
        registry.register(_entry("a", counterpart="b"))
    registry.register(_entry("b"))
    registry.register(_entry("a", counterpart="b"))
    assert [e.name for e in registry.entries()] == ["b", "a"]
    assert registry.get("a").counterpart == "b"
    with pytest.raises(KeyError, match="'zzz'"):
        registry.get("zzz")


@pytest.mark.parametrize("bad", [0.0, -8.0, math.nan, math.inf])
def test_entry_rejects_bad_byte_model(bad):
    with pytest.raises(ValueError, match="bytes_per_param"):
        BenchEntry(name="x", make=lambda: optax.sgd(0.1), bytes_per_param=bad)


def test_entry_rejects_itself_as_counterpart():
    with pytest.raises(ValueError, match="itself"):
        _entry("x", counterpart="x")


def test_goals_name_registered_entries_and_a_valid_ratio():
    registry = Registry()
    registry.register(_entry("a"))
    goal = BenchGoal(name="a/b", numerator="a", denominator="b", max_ratio=1.0)
    with pytest.raises(ValueError, match="names entry 'b', not registered"):
        registry.register_goal(goal)
    registry.register(_entry("b"))
    registry.register_goal(goal)
    assert registry.goals() == [goal]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_goal(goal)
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="max_ratio"):
            BenchGoal(name="g", numerator="a", denominator="b", max_ratio=bad)
    with pytest.raises(ValueError, match="part"):
        BenchGoal(name="g", numerator="a", denominator="b", max_ratio=1.0, part="steps")
    with pytest.raises(ValueError, match="by itself"):
        BenchGoal(name="g", numerator="a", denominator="a", max_ratio=1.0)


def test_evaluate_goals_divides_medians_per_size_and_model():
    def row(name, t, ts, **extra):
        return {"name": name, "time_s": t, "step_time_s": t, "times_s": ts, **extra}

    updates = [
        row("a", 2.0, [2.0, 2.0, 5.0], num_params=1000),
        row("b", 1.0, [1.0, 1.0, 1.0], num_params=1000),
        row("a", 3.0, [3.0], num_params=2_000_000),  # no "b" at this size: no row
    ]
    train = [row("a", 1.0, [1.0], model="mlp"), row("b", 2.0, [2.0], model="mlp")]
    train += [row("a", 9.0, [9.0], model="cnn"), row("b", 1.0, [1.0], model="cnn")]
    gs = [
        BenchGoal(name="u", numerator="a", denominator="b", max_ratio=1.5),
        BenchGoal(
            name="t",
            numerator="a",
            denominator="b",
            max_ratio=1.0,
            part="train_steps",
            models=("mlp",),
        ),
    ]
    got = evaluate_goals(gs, updates, train)
    assert [(g["goal"], g["where"]) for g in got] == [
        ("u", "1,000 params"),
        ("t", "mlp train step"),
    ]
    assert (got[0]["ratio"], got[0]["mean_ratio"], got[0]["met"]) == (2.0, 3.0, False)
    assert (got[1]["ratio"], got[1]["met"]) == (0.5, True)


def test_update_fn_returns_the_state_first_so_donation_pairs_leaf_by_leaf():
    # JAX pairs donated inputs with outputs in output order: with the state first, every
    # state leaf is written back into its own buffer (so a state that passes through, e.g.
    # Lookahead's slow weights off a sync step, is not copied).
    entry = get_entry("optlab.multilayer_lookahead x2")
    tx = entry.make()
    params = {"w": jnp.ones(64), "b": jnp.zeros(8)}
    state = tx.init(params)
    fn = make_update_fn(entry, tx)
    header = fn.lower(params, state, params).compile().as_text().splitlines()[0]
    num_grads, num_state = len(jax.tree.leaves(params)), len(jax.tree.leaves(state))
    for i in range(num_state):  # output i (a state leaf) <- input num_grads + i
        assert f"{{{i}}}: ({num_grads + i}, {{}}" in header, header
    slow_leaves = jax.tree.leaves(state.slow)
    new_state, updates = fn(params, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(x.is_deleted() for x in slow_leaves)


def test_default_registry_starts_with_the_baselines():
    names = [e.name for e in entries()]
    assert names[:3] == [SGD_NAME, "optax.sgd(momentum=0.9)", "optax.adam"]
    for entry in entries():
        if entry.counterpart is not None:
            assert names.index(entry.counterpart) < names.index(entry.name)


# --- byte models ------------------------------------------------------------------------


def _compulsory_bytes(entry: BenchEntry, params) -> int:
    """Bytes of every per-parameter array one update reads or writes (scalars ignored)."""
    tx = entry.make()
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    state = jax.jit(tx.init)(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)

    def arrays(tree):
        return [leaf for leaf in jax.tree.leaves(tree) if np.ndim(leaf) > 0]

    return tree_nbytes(arrays(grads) + arrays(state) + arrays(new_state) + arrays(updates))


def test_sgd_byte_model_equals_grads_plus_updates():
    params = model_like_tree(2000, np.random.default_rng(0))
    sgd = get_entry(SGD_NAME)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = sgd.make().update(grads, sgd.make().init(params), params)
    n = param_count(params)
    assert tree_nbytes(grads) + tree_nbytes(updates) == sgd.bytes_per_param * n
    assert _compulsory_bytes(sgd, params) == sgd.bytes_per_param * n


@pytest.mark.parametrize("name", ["optax.sgd(momentum=0.9)", "optax.adam"])
def test_baseline_byte_models_match_their_arrays(name):
    params = model_like_tree(2000, np.random.default_rng(0))
    entry = get_entry(name)
    assert _compulsory_bytes(entry, params) == entry.bytes_per_param * param_count(params)


# --- pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [1, 1000, 1_000_000, 10_000_000])
def test_model_like_shapes_are_close_to_the_target(target):
    shapes = jax.tree.leaves(model_like_shapes(target), is_leaf=lambda s: isinstance(s, tuple))
    total = sum(math.prod(s) for s in shapes)
    assert len(shapes) >= 8
    assert len({len(s) for s in shapes}) >= 2
    if target >= 1000:
        assert abs(total - target) / target < 0.1


def test_in_place_bandwidth_kernel_does_the_work():
    # Donation must not let XLA skip the read/write: every call adds c to every element.
    x = jnp.zeros((1024,), jnp.float32)
    y = add_in_place(x, jnp.float32(1.0))
    y = add_in_place(y, jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(y), np.full(1024, 2.0, np.float32))
    assert x.is_deleted()  # the input buffer was reused for the output
    result = measure_bandwidth(0.01, reps=2, warmup=1)
    assert _positive_finite(result.gbs)
    assert _positive_finite(result.fresh_output_gbs)
    assert len(result.times_s) == len(result.fresh_output_times_s) == 2


def test_interleaved_times_rotates_round_robin():
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(runners, reps=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def _grad_fn_sgd(lr: float) -> optax.GradientTransformationExtraArgs:
    """Steps along the gradient that ``grad_fn`` returns at the current params."""

    def update(grads, state, params=None, *, grad_fn, **extra):
        del grads, extra
        return jax.tree.map(lambda g: -lr * g, grad_fn(params)), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_bench_updates_passes_grad_fn_and_reports_counterpart_ratio():
    bench_entries = [
        _entry(SGD_NAME),
        BenchEntry(
            name="grad_fn_sgd",
            make=lambda: _grad_fn_sgd(0.1),
            bytes_per_param=20.0,
            counterpart=SGD_NAME,
            needs_grad_fn=True,
        ),
        BenchEntry(
            name="no_params",
            make=lambda: optax.sgd(0.1),
            bytes_per_param=8.0,
            params_in_update=False,
        ),
    ]
    rows = bench_updates(bench_entries, [300], reps=2, bandwidth_gbs=1.0)
    assert [r["name"] for r in rows] == ["optax.sgd", "grad_fn_sgd", "no_params"]
    row = rows[1]
    assert row["counterpart"] == SGD_NAME
    assert row["ratio_to_counterpart"] == pytest.approx(row["ratio_to_sgd"])
    assert _positive_finite(row["ratio_to_counterpart"])
    assert rows[0]["ratio_to_counterpart"] is None
    assert rows[0]["ratio_to_sgd"] == 1.0


# --- Lookahead entries --------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_lookahead_entries_follow_the_same_trajectory_as_their_optax_counterpart(levels):
    # A fair ratio: optlab and the nested optax.lookahead take identical steps (same inner
    # SGD, k, alpha) on a quadratic; optax's fast/slow params are the optlab params / state.
    from experiments.bench.entries_lookahead import OPTAX_ENTRIES, OPTLAB_ENTRIES

    ours, theirs = OPTLAB_ENTRIES[levels], OPTAX_ENTRIES[levels]
    assert ours.counterpart == theirs.name
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    target = jax.tree.map(lambda p: p + 3.0, params)
    grad = lambda p: jax.tree.map(lambda x, t: x - t, p, target)
    tx_ours, tx_theirs = ours.make(), theirs.make()
    p_ours, p_theirs = params, theirs.make_params(params)
    s_ours, s_theirs = tx_ours.init(p_ours), tx_theirs.init(p_theirs)

    @jax.jit
    def step(p_ours, s_ours, p_theirs, s_theirs):
        u, s_ours = tx_ours.update(grad(p_ours), s_ours, p_ours)
        v, s_theirs = tx_theirs.update(grad(_fast(p_theirs, levels)), s_theirs, p_theirs)
        return optax.apply_updates(p_ours, u), s_ours, optax.apply_updates(p_theirs, v), s_theirs

    for _ in range(5**levels + 3):  # one top-level sync and a few steps past it
        p_ours, s_ours, p_theirs, s_theirs = step(p_ours, s_ours, p_theirs, s_theirs)
        _assert_trees_close(p_ours, _fast(p_theirs, levels))
    slow = p_theirs
    for _ in range(levels):
        slow = slow.slow
    _assert_trees_close(optlab.slow_params(s_ours), slow)
    assert not np.allclose(slow["a"], params["a"])  # the top level did move


def _fast(params, levels):
    for _ in range(levels):
        params = params.fast
    return params


def _assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_optlab_lookahead_byte_model_matches_the_arrays_of_a_cycle(levels):
    # Over one top-level cycle, count per step the arrays the update must touch: it reads
    # g and writes u; after a step after which levels 1..d sync, it also reads x and those
    # d levels and writes the d levels. The mean over the cycle is the entry's byte model.
    # The implementation writes no other level on that step; on the next one (the first of
    # the new cycles) it re-anchors levels 1..d to x, an overhead the model leaves out.
    from experiments.bench.entries_lookahead import OPTLAB_ENTRIES, SYNC_PERIOD

    entry = OPTLAB_ENTRIES[levels]
    tx = entry.make()
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    total, anchored = 0, 0
    cycle = SYNC_PERIOD**levels
    for t in range(cycle):
        depth = sum((t + 1) % SYNC_PERIOD ** (level + 1) == 0 for level in range(levels))
        total += 4 * (2 + (1 + 2 * depth if depth else 0))  # g, u; x, d levels read + written
        updates, new_state = update({"w": jnp.ones(4)}, state, params)
        pairs = zip(state.slow, new_state.slow, strict=True)
        changed = [not np.array_equal(a["w"], b["w"]) for a, b in pairs]
        assert not any(changed[max(depth, anchored) :]), (t, changed)
        anchored = depth
        params, state = optax.apply_updates(params, updates), new_state
    assert total / cycle == pytest.approx(entry.bytes_per_param)
    assert entry.make_params is None


def test_idle_state_entry_is_sgd_with_untouched_copies():
    from experiments.bench.entries_lookahead import IDLE_STATE

    tx, sgd = IDLE_STATE.make(), get_entry(SGD_NAME).make()
    params = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    expected, _ = sgd.update(grads, sgd.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
    assert len(new_state.copies) == 3
    jax.tree.map(np.testing.assert_array_equal, new_state.copies, (params,) * 3)


# --- communication (issue #10) ------------------------------------------------------------


_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%sync (p: f32[8]) -> f32[8] {
  %p = f32[8] parameter(0)
  ROOT %r = f32[8]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%local (p: f32[8]) -> f32[8] {
  ROOT %p = f32[8] parameter(0)
}

%round0 (q: f32[4]) -> f32[4] {
  %q = f32[4] parameter(0)
  ROOT %c = f32[4]{0} collective-permute(%q), source_target_pairs={{0,1},{1,0}}
}

%round1 (q: f32[4]) -> f32[4] {
  %q = f32[4] parameter(0)
  ROOT %c = f32[4]{0} collective-permute(%q), source_target_pairs={{0,1},{1,0}}
}

%round2 (q: f32[4]) -> f32[4] {
  ROOT %q = f32[4] parameter(0)
}

ENTRY %main (x: f32[10], p: f32[8], q: f32[4], k: s32[], c: pred[]) -> f32[10] {
  %x = f32[10] parameter(0)
  %g = (f32[10]{0}, bf16[6]{0}) all-reduce(%x, %x), replica_groups={}, to_apply=%add
  %d = f32[8]{0} conditional(%c, %p, %p), branch_computations={%sync, %local}
  %e = f32[4]{0} conditional(%k, %q, %q, %q), branch_computations={%round0, %round1, %round2}
  ROOT %x2 = f32[10] copy(%x)
}
"""


def test_collective_bytes_weights_conditional_branches():
    from experiments.bench.communication import collective_bytes

    out = collective_bytes(_HLO, sync_period=4)
    # Every step: 10 f32 + 6 bf16; the sync branch 8 f32 on 1/4 of the steps; a 3-way
    # switch with a 4-float permute in two branches: 2/3 of 16 bytes per step.
    assert out["all-reduce"] == pytest.approx(40 + 12 + 32 / 4)
    assert out["collective-permute"] == pytest.approx(2 * 16 / 3)
    assert out["total"] == pytest.approx(out["all-reduce"] + out["collective-permute"])


def test_compiled_local_methods_send_one_hth_of_dp_and_palsgd_skips():
    """On 4 devices (shard_map): Local SGD and PALSGD move 1/H of DP's bytes per step over
    a period; the PALSGD step with the gradient under its coin's cond counts what it ran."""
    from experiments.bench import communication as comm

    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    batch = {"x": jnp.arange(24.0).reshape(4, 2, 3) / 24, "y": jnp.ones((4, 2, 2))}

    def loss(p, b):
        return jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)

    table = comm.methods(4, prob=0.5)
    sent = {}
    for name in ("dp (mean_gradients)", "local_sgd(H=4)"):
        make, period = table[name]
        _, _, hlo = comm._compiled(make, loss, params, batch, 4)
        sent[name] = comm.collective_bytes(hlo, period)["total"]
    fn, (p, s, b), hlo = comm._compiled(
        table["palsgd(H=4,p=0.5)"][0], loss, params, batch, 4, skip=True
    )
    sent["palsgd"] = comm.collective_bytes(hlo, 4)["total"]
    assert sent["dp (mean_gradients)"] == 4 * 8  # 8 floats, every step
    assert sent["local_sgd(H=4)"] == sent["dp (mean_gradients)"] / 4
    assert sent["palsgd"] == sent["dp (mean_gradients)"] / 4
    performed, pseudo = np.zeros(4), np.zeros(4)
    for _ in range(12):
        pseudo += np.asarray(s.pseudo_sync)
        p, s, evals = fn(p, s, b)
        performed += np.asarray(evals)
    np.testing.assert_array_equal(performed, 12 - pseudo)
    assert 0 < pseudo.sum() < 48
