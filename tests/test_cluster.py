"""MBC: the clustering recovers planted groups, deterministically; `edgelora cluster` writes its JSON
and heat map; a library of cluster LoRAs is trained on the tiny model, installed as the bundle's
second library, hashed, verified and composed by `adapt --library mbc`; every bad input is one line."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_refused, cli, cli_here

from edgelora.bundle import Bundle, write_manifest
from edgelora.cluster import cluster_loras, keep_largest
from edgelora.lora import Lora, load_lora, save_lora

PROMPTS = ["What is 2 plus 3?", "red green blue", "Today is 01/02/1987."]


def planted(shapes: dict[str, tuple[int, int]], layers: int, groups: int, per_group: int, seed: int = 0,
            noise: float = 0.3) -> tuple[list[Lora], list[set[str]]]:
    """`groups` distinct random LoRAs and `per_group` noisy copies of each, named so that name
    order says nothing of the group."""
    rng = np.random.default_rng(seed)
    loras, truth = [], []
    names = iter(rng.permutation(groups * per_group))
    for _ in range(groups):
        A = {m: rng.normal(0, 1, (layers, 4, i)) for m, (i, o) in shapes.items()}
        B = {m: rng.normal(0, 1, (layers, o, 4)) for m, (i, o) in shapes.items()}
        members = set()
        for _ in range(per_group):
            name = f"task{next(names):02d}"
            members.add(name)
            loras.append(Lora(name, 4, 8.0, {m: (a + rng.normal(0, noise, a.shape)).astype(np.float32) for m, a in A.items()},
                              {m: (b + rng.normal(0, noise, b.shape)).astype(np.float32) for m, b in B.items()}))
        truth.append(members)
    return loras, truth


def test_keep_largest_keeps_exactly_the_largest_half():
    x = np.array([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 7.0, -0.05], np.float32)
    assert keep_largest(x).tolist() == pytest.approx([0, -5.0, 0.3, 2.0, 0, 0, 7.0, 0])
    y = np.random.default_rng(0).normal(size=1001).astype(np.float32)
    kept = keep_largest(y)
    assert np.count_nonzero(kept) == 500
    assert np.abs(y[kept == 0]).max() <= np.abs(y[kept != 0]).min()
    assert np.array_equal(kept[kept != 0], y[kept != 0])
    ties = keep_largest(np.ones(10, np.float32))  # ties broken, not all kept
    assert np.count_nonzero(ties) == 5


def test_planted_groups_are_recovered_for_every_seed():
    loras, truth = planted({"q_proj": (16, 16), "v_proj": (16, 8)}, layers=2, groups=3, per_group=4)
    found = []
    for seed in range(4):
        c = cluster_loras(loras, 3, seed)
        assert sorted(map(sorted, c.clusters.values())) == sorted(map(sorted, truth))
        found.append(c.clusters)
    assert all(f == found[0] for f in found)  # ids follow the first member's name, not k-means' numbering
    again = cluster_loras(list(reversed(loras)), 3, 0)  # the input order does not matter either
    assert again.clusters == found[0] and np.array_equal(again.similarity, cluster_loras(loras, 3, 0).similarity)
    group = {n: g for g, members in enumerate(truth) for n in members}
    S, names = again.similarity, again.names
    between = [S[i, j] for i in range(len(names)) for j in range(len(names)) if group[names[i]] != group[names[j]]]
    assert min(again.within(m) for m in again.clusters.values()) > 0.5 > max(np.abs(between))


@pytest.fixture
def clustered_bundle(tiny_bundle) -> tuple[Path, list[set[str]]]:
    """The tiny bundle with 6 per-task LoRAs in 2 planted groups."""
    b = Bundle.open(tiny_bundle)
    shapes = {m: (t["in"], t["out"]) for m, t in b.targets.items()}
    loras, truth = planted(shapes, b.arch["layers"], groups=2, per_group=3, seed=1)
    for l in loras:
        save_lora(tiny_bundle / "loras" / f"{l.name}.safetensors", l, np.float16)
    write_manifest(tiny_bundle, b.manifest)
    return tiny_bundle, truth


def test_cluster_cli_writes_json_and_heatmap_deterministically(clustered_bundle, tmp_path):
    bundle, truth = clustered_bundle
    out = tmp_path / "c.json"
    r = cli("edgelora.cli", "cluster", "--bundle", str(bundle), "--k", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "cluster_0" in r.stdout and "cluster_1" in r.stdout
    data = json.loads(out.read_text())
    assert sorted(map(sorted, data["clusters"].values())) == sorted(map(sorted, truth))
    assert data["format"] == "edgelora-clusters" and data["settings"]["k"] == 2 and data["settings"]["keep"] == 0.5
    assert data["settings"]["svd_dims"] == 6 and data["bundle"]["path"] == str(bundle) and "numpy" in data["versions"]
    assert data["order"] == [n for m in data["clusters"].values() for n in m] and len(data["similarity"]) == 6
    svg = ET.parse(out.with_suffix(".svg")).getroot()  # well-formed
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert set(data["order"]) <= texts and {"cluster_0", "cluster_1"} <= texts
    r2 = cli("edgelora.cli", "cluster", "--bundle", str(bundle), "--k", "2", "-o", str(tmp_path / "again.json"), "--json")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["clusters"] == data["clusters"]
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: v for k, v in again.items() if k != "heatmap"} == {k: v for k, v in data.items() if k != "heatmap"}
    assert (tmp_path / "again.svg").read_text() == out.with_suffix(".svg").read_text()


def test_cluster_cli_bad_inputs(clustered_bundle, tiny_bundle_ro, tmp_path):
    bundle, _ = clustered_bundle
    assert_refused(cli("edgelora.cli", "cluster", "--bundle", str(bundle), "--k", "7", "-o", str(tmp_path / "c.json")),
                   "--k 7", str(bundle), "has 6")
    assert_refused(cli("edgelora.cli", "cluster", "--bundle", str(bundle), "--k", "0", "-o", str(tmp_path / "c.json")),
                   "--k 0")
    assert_refused(cli("edgelora.cli", "cluster", "--bundle", str(bundle), "-o", str(tmp_path / "c.svg")), "c.svg")
    assert_refused(cli("edgelora.cli", "cluster", "--bundle", str(tiny_bundle_ro), "-o", str(tmp_path / "c.json")),
                   str(tiny_bundle_ro), "no per-task library")
    assert not list(tmp_path.glob("c.*"))


# -- training a cluster library on the tiny model ------------------------------------------
def write_task(folder: Path, name: str, answer: str, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"input": f"{PROMPTS[i % 3]} ({name} {i})", "output": answer}) + "\n"
                         for i in range(n)))
    return f


@pytest.fixture
def tasks_and_clusters(tmp_path) -> tuple[Path, Path]:
    tasks = tmp_path / "upstream"
    for name, answer in (("t_red", "red"), ("t_blue", "blue"), ("t_five", "5")):
        write_task(tasks, name, answer)
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps({"clusters": {"cluster_0": ["t_blue", "t_red"], "cluster_1": ["t_five"]}}))
    return tasks, clusters


TRAIN_FLAGS = ["--rank", "4", "--alpha", "8", "--steps", "3", "--batch", "4", "--eval-every", "3", "--max-len", "64"]


def test_cluster_library_trained_installed_verified_and_adapted(tiny_bundle, tiny_hf, tasks_and_clusters, tmp_path):
    tasks, clusters = tasks_and_clusters
    out = tmp_path / "mbc"
    r = cli("edgelora_export.cli", "library", str(tasks), "-o", str(out), "--clusters", str(clusters),
            "--bundle", str(tiny_bundle), "--base", str(tiny_hf), *TRAIN_FLAGS)
    assert r.returncode == 0, r.stderr
    # the union of a cluster's tasks is what its LoRA learned from
    assert len((out / "data" / "cluster_0.jsonl").read_text().splitlines()) == 24
    report = json.loads((out / "report.json").read_text())
    assert report["clusters"] == {"cluster_0": ["t_blue", "t_red"], "cluster_1": ["t_five"]}
    assert [(row["task"], row["examples"]) for row in report["tasks"]] == [("cluster_0", 24), ("cluster_1", 12)]
    assert "t_blue, t_red" in load_lora(out / "cluster_0.safetensors").source
    # installed beside the per-task library, hashed like it, and checked by verify
    b = Bundle.open(tiny_bundle)
    assert sorted(b.lora_paths("mbc")) == ["cluster_0", "cluster_1"] and b.lora_paths() == {}
    assert {"loras-mbc/cluster_0.safetensors", "loras-mbc/cluster_1.safetensors"} <= set(b.manifest["files"])
    assert cli("edgelora.cli", "verify", "--bundle", str(tiny_bundle)).returncode == 0
    info = json.loads(cli("edgelora.cli", "info", "--bundle", str(tiny_bundle), "--json").stdout)
    assert [l["name"] for l in info["loras_mbc"]] == ["cluster_0", "cluster_1"]
    # adapt composes the cluster LoRAs; weights.json says which library
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps({"input": p, "output": "red"}) + "\n" for p in PROMPTS))
    r = cli("edgelora.cli", "adapt", str(ex), "--bundle", str(tiny_bundle), "--library", "mbc", "--budget", "4",
            "--out", str(tmp_path / "adapted"), "--quant", "none", "--json")
    assert r.returncode == 0, r.stderr
    weights = json.loads((tmp_path / "adapted" / "weights.json").read_text())
    assert sorted(weights["weights"]) == ["cluster_0", "cluster_1"] and weights["settings"]["library"] == "mbc"
    r = cli("edgelora.cli", "eval", str(ex), "--model", str(tmp_path / "adapted"), "--library", "mbc", "--json",
            "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["library"] == "mbc"
    assert_refused(cli("edgelora.cli", "eval", str(ex), "--model", str(tmp_path / "adapted"), "--library", "per-task"),
                   "adapted with the mbc library", "weights.json")
    # a damaged cluster LoRA is caught like any bundle file
    f = tiny_bundle / "loras-mbc" / "cluster_1.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    assert_refused(cli("edgelora.cli", "verify", "--bundle", str(tiny_bundle)), "loras-mbc/cluster_1.safetensors")


def test_cluster_library_resumes_and_refuses_other_clusters(tiny_hf, tasks_and_clusters, tmp_path):
    from dataclasses import asdict
    from edgelora.errors import UserError
    from edgelora.io import atomic_write_json
    from edgelora_export.library import train_library
    from edgelora_export.train import TrainConfig
    tasks, clusters = tasks_and_clusters
    cfg = TrainConfig(rank=4, alpha=8, steps=2, batch=4, eval_every=2, max_len=64)
    out = tmp_path / "mbc"
    first = train_library(tasks, out, cfg, str(tiny_hf), log=lambda *a: None, clusters_file=clusters)
    logs = []
    assert train_library(tasks, out, cfg, str(tiny_hf), log=logs.append, clusters_file=clusters) == first
    assert logs == []  # nothing trained again
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"clusters": {"cluster_0": ["t_blue"], "cluster_1": ["t_red", "t_five"]}}))
    with pytest.raises(UserError, match="other clusters"):
        train_library(tasks, out, cfg, str(tiny_hf), clusters_file=other)
    per_task = tmp_path / "per-task"  # a per-task library's report: its LoRAs are not cluster LoRAs
    atomic_write_json(per_task / "report.json", {"config": asdict(cfg), "tasks": []})
    with pytest.raises(UserError, match="one LoRA per task"):
        train_library(tasks, per_task, cfg, str(tiny_hf), clusters_file=clusters)


@pytest.mark.parametrize("content,words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["expected a JSON object"]),
    ('{"k": 10}', ['needs "clusters"']),
    ('{"clusters": {"c0": ["t_red", "t_nope"], "c1": ["t_zzz"]}}', ["t_nope, t_zzz", "upstream"]),
    ('{"clusters": {"c0": ["t_red"], "c1": ["t_red"]}}', ["t_red is in both c0 and c1"]),
    ('{"clusters": {"../x": ["t_red"]}}', ["cluster name '../x'"]),
    ('{"clusters": {"c0": []}}', ["c0 must list"]),
])
def test_bad_clusters_files_are_one_line(tasks_and_clusters, tmp_path, capsys, content, words):
    """In-process (each case would otherwise pay torch's import): refused before the model loads."""
    from edgelora_export.cli import main
    tasks, _ = tasks_and_clusters
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code = main(["library", str(tasks), "-o", str(tmp_path / "o"), "--clusters", str(bad)])
    assert_refused(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), str(bad), *words)
    assert not (tmp_path / "o").exists()


def test_missing_mbc_library_is_one_line(tiny_bundle_ro, tmp_path, capsys):
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps({"input": p, "output": "red"}) + "\n" for p in PROMPTS))
    b = str(tiny_bundle_ro)
    for args in (["adapt", str(ex), "--bundle", b, "--out", str(tmp_path / "a")], ["eval", str(ex), "--model", b]):
        assert_refused(cli("edgelora.cli", *args, "--library", "mbc"), b, "no mbc library", "edgelora-export library")
    r = cli_here(capsys, "edgelora_export.cli", "library", str(tmp_path), "-o", str(tmp_path / "o"), "--bundle",
                 str(tiny_bundle_ro))
    assert_refused(r, "--clusters")


def test_export_lora_adds_to_the_mbc_library(tiny_bundle, tiny_hf, tmp_path):
    from helpers import make_peft_lora
    r = cli("edgelora_export.cli", "lora", str(make_peft_lora(tiny_hf, tmp_path / "peft", seed=2)), "--bundle",
            str(tiny_bundle), "--name", "cluster_x", "--library", "mbc")
    assert r.returncode == 0, r.stderr
    b = Bundle.open(tiny_bundle)
    assert list(b.lora_paths("mbc")) == ["cluster_x"] and b.lora_paths("per-task") == {}
    assert "loras-mbc/cluster_x.safetensors" in b.manifest["files"]


def test_cluster_out_replaces_only_its_own_files_unless_forced(clustered_bundle, tmp_path, capsys):
    """-o (and the heat map written beside it) over a file edgelora did not write is refused in one
    line; an earlier run's files are replaced; --force replaces anything."""
    from edgelora.cli import main
    bundle, _ = clustered_bundle
    out = tmp_path / "c.json"
    argv = ["cluster", "--bundle", str(bundle), "--k", "2", "-o", str(out), "--json"]
    for mine in (out, out.with_suffix(".svg")):
        mine.write_text("the user's own\n")
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and mine.name in err[0] and "--force" in err[0], err
        assert mine.read_text() == "the user's own\n"
        assert main(argv + ["--force"]) == 0
        assert json.loads(out.read_text())["format"] == "edgelora-clusters"
        assert main(argv) == 0  # its own files now: replaced without --force


# -- the shipped MBC library ------------------------------------------------------------------
EXPORT = Path(__file__).resolve().parent.parent / "export"


def test_every_shipped_library_file_is_package_data():
    """`pip install ./export` (not editable) installs only what package-data names: the shipped
    libraries, each adapter and its report, must be in it, or the documented commands find nothing."""
    import fnmatch
    import tomllib
    data = tomllib.loads((EXPORT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edgelora_export"]
    pkg = EXPORT / "edgelora_export"
    for library in ("library", "library-mbc", "library-prompts"):
        shipped = sorted(p.relative_to(pkg).as_posix() for p in (pkg / library).glob("*")
                         if p.is_file() and (p.suffix == ".safetensors" or p.stem == "report"))
        assert shipped, library
        missing = [f for f in shipped if not any(fnmatch.fnmatch(f, g) for g in data)]
        assert not missing, f"not package data: {missing}"


def test_export_base_mbc_installs_the_shipped_cluster_library(tiny_bundle, capsys, monkeypatch, tmp_path):
    """`edgelora-export base --mbc`, on a bundle that exists, installs the shipped MBC library as its
    mbc library (here a stand-in of LoRAs shaped for the tiny model: the shipped ones are SmolLM2's)."""
    from helpers import cli_here
    from edgelora_export import lora as export_lora
    b = Bundle.open(tiny_bundle)
    shapes = {m: (t["in"], t["out"]) for m, t in b.targets.items()}
    loras, _ = planted(shapes, b.arch["layers"], groups=1, per_group=2, seed=3)
    for l in loras:
        save_lora(tmp_path / f"cluster_{l.name}.safetensors", l, np.float16)
    monkeypatch.setitem(export_lora.SHIPPED, "mbc", tmp_path)
    r = cli_here(capsys, "edgelora_export.cli", "base", "-o", str(tiny_bundle), "--mbc")
    assert r.returncode == 0, r.stderr
    b = Bundle.open(tiny_bundle)
    assert sorted(b.lora_paths("mbc")) == sorted(f"cluster_{l.name}" for l in loras) and b.verify() == []


def test_cluster_outputs_in_a_checkout_are_ignored_by_git():
    """`edgelora cluster` run in the checkout writes clusters.json and clusters.svg there by default."""
    import shutil
    root = EXPORT.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "clusters.json", "clusters.svg"], cwd=root, capture_output=True, text=True)
    assert r.stdout.split() == ["clusters.json", "clusters.svg"], r.stdout
