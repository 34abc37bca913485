"""loes.distributed.extract on a local Ray cluster (started once for this file): 2 CPU workers
write the store of export_features; finished shards are not redone; `loes extract --ray`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'loes[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'loes[ray]'")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import LOESError  # noqa: E402
from loes.cli import main  # noqa: E402
from loes.datasets import load_drugreview, minilm_path  # noqa: E402
from loes.distributed import extract  # noqa: E402
from loes.hf import export_features  # noqa: E402
from loes.store import load_features  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

N_ROWS, SHARD = 40, 8
QUIET = dict(show_progress=False)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the whole file (4 CPUs: 2 actors plus room for Ray Data's own work)."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
        )
    except Exception as e:  # no shared memory, no sockets, ...
        pytest.skip(f"Ray cannot start a local cluster on this machine: {e}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random BERT folder (with MiniLM's tokenizer), the rows as a CSV, and the
    single-process store they must give."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=30522,
        max_position_embeddings=128,
    )
    base = tmp_path_factory.mktemp("ray")
    folder = base / "model"
    with contextlib.redirect_stderr(io.StringIO()):
        transformers.BertModel(cfg).eval().save_pretrained(str(folder))
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(str(folder))
    ds = load_drugreview("test").select(range(N_ROWS))
    rows = datasets.Dataset.from_dict(
        {"text": [t[:160] for t in ds["text"]], "label": list(ds["label"])}
    )
    csv = base / "rows.csv"
    rows.to_csv(str(csv), index=False)
    ref = export_features(str(folder), rows, base / "ref", layers=[0, 2], shard_rows=SHARD, **QUIET)
    return base, str(folder), rows, str(csv), ref


def _assert_same(store, ref):
    x, y = store.load()
    xr, yr = ref.load()
    assert store.layers == ref.layers == [0, 2] and len(store) == len(ref) == N_ROWS
    assert store.manifest["plan_id"] == ref.manifest["plan_id"]  # the same settings
    torch.testing.assert_close(x, xr, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y, yr)


def test_workers_write_the_store_and_a_failing_shard_is_reported(cluster, setup):
    """2 CPU workers, a model object and an in-memory dataset (shipped through the object
    store); one shard's bad row is a LOESError naming it, the other shards are written."""
    base, folder, rows, csv, ref = setup
    out = base / "ray"
    texts = list(rows["text"])
    texts[12] = None  # row 4 of shard 1
    broken = datasets.Dataset.from_dict({"text": texts, "label": list(rows["label"])})
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with pytest.raises(LOESError, match=r"1 shard\(s\) failed.*shard 1 \(dataset rows 8\.\.15"):
        extract(model, broken, out, layers=[0, 2], shard_rows=SHARD, num_workers=2, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == [
        f"shard-0000{s}.safetensors" for s in (0, 2, 3, 4)
    ]
    assert model.training is False and next(model.parameters()).device.type == "cpu"

    with pytest.raises(LOESError, match="written with other settings"):
        extract(folder, csv, out, layers=[0, 2], shard_rows=SHARD, pooling="masked_mean")
    with pytest.raises(LOESError, match="cannot be split between Ray workers"):
        extract(folder, (dict(r) for r in rows), base / "s", shard_rows=SHARD)
    with pytest.raises(LOESError, match="num_workers must be"):
        extract(folder, csv, base / "s", num_workers=0)


def test_cli_extract_ray_redoes_only_the_missing_shard(cluster, setup, capsys):
    """Resumable across paths: the store of the test above is finished by workers that read
    the CSV and load the model folder themselves; only the failed shard is computed, and the
    store equals the single-process one."""
    base, folder, _, csv, ref = setup
    out = base / "ray"
    if not out.exists():  # run alone: the same state from the single-process store
        shutil.copytree(ref.path, out)
        for name in ("manifest.json", "shard-00001.safetensors"):
            (out / name).unlink()
    argv = ["extract", folder, csv, "--output", str(out), "--layers", "0,2"]
    code = main(argv + ["--shard-rows", str(SHARD), "--ray", "--workers", "2", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["computed"] == [1] and summary["rows"] == N_ROWS
    _assert_same(load_features(out), ref)
    done = extract(folder, csv, out, layers=[0, 2], shard_rows=SHARD, num_workers=2, **QUIET)
    assert done.info["computed"] == [] and done.info["workers"] == 0  # no pool started
