"""grain pipelines: TFDS mock_data, image folder with a corrupt file, host sharding, exact resume, eval."""
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffaug_jax.data import checkpointing
from diffaug_jax.data import config as data_config
from diffaug_jax.data import pipeline

from test_data_sources import make_folder  # pylint: disable=g-bad-import-order


def _hash(img):
  return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _cifar_cfg(transform="cifar"):
  cfg = data_config.cifar10_config(data_dir="")
  cfg.train_transform = transform
  cfg.read_threads = 2
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_tfds_mock_shapes_and_determinism():
  with tfds.testing.mock_data(num_examples=12):
    cfg = _cifar_cfg()
    a = _take(pipeline.make_train_loader(cfg, global_batch_size=4, seed=1), 4)
    b = _take(pipeline.make_train_loader(cfg, global_batch_size=4, seed=1), 4)
    c = _take(pipeline.make_train_loader(cfg, global_batch_size=4, seed=2), 4)
  assert set(a[0]) == {"image", "image_da", "label"}
  assert a[0]["image"].shape == a[0]["image_da"].shape == (4, 32, 32, 3)
  assert a[0]["image"].dtype == np.uint8 and a[0]["label"].dtype == np.int32
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_da_view_false_skips_the_diffaug_view_only():
  """da_view=False (a run that never reads "image_da"): the key is gone and the clean views are the same
  images, since the DiffAug view draws no randomness."""
  with tfds.testing.mock_data(num_examples=12):
    cfg = _cifar_cfg("rand_augment")
    with_da = _take(pipeline.make_train_loader(cfg, global_batch_size=4, seed=1), 2)
    without = _take(pipeline.make_train_loader(cfg, global_batch_size=4, seed=1, da_view=False), 2)
  assert set(with_da[0]) == {"image", "image_da", "label"} and set(without[0]) == {"image", "label"}
  for a, b in zip(with_da, without):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def _concat_hosts(cfg, *, gbs, hosts, steps, seed=0, state=None):
  """The host batches of each step concatenated in process order (what make_array_from_process_local_data
  builds), optionally after setting each host iterator to `state`."""
  its = [pipeline.make_train_loader(cfg, global_batch_size=gbs, seed=seed, process_index=h,
                                    process_count=hosts) for h in range(hosts)]
  if state is not None:
    for it in its:
      it.set_state(state)
  per_host = [_take(it, steps) for it in its]
  for batches in per_host:
    assert batches[0]["image"].shape[0] == gbs // hosts
  return [{k: np.concatenate([per_host[h][s][k] for h in range(hosts)]) for k in per_host[0][s]}
          for s in range(steps)]


def test_host_slices_concatenate_to_the_one_host_global_batch():
  """P = 1, 2, 4 hosts see the same global batches (images with random crop/flip, views, labels) over
  2+ epochs incl. the reshuffle; each epoch is N // B full batches without repeats (remainder dropped)."""
  n, gbs = 18, 8  # K = 2 batches per epoch, 2 examples of each epoch's permutation skipped
  with tfds.testing.mock_data(num_examples=n):
    cfg = _cifar_cfg("cifar")
    ref = _concat_hosts(cfg, gbs=gbs, hosts=1, steps=6)  # 3 epochs
    for hosts in (2, 4):
      got = _concat_hosts(cfg, gbs=gbs, hosts=hosts, steps=6)
      for s, (x, y) in enumerate(zip(ref, got)):
        assert set(x) == set(y) == {"image", "image_da", "label"}
        for k in x:
          np.testing.assert_array_equal(x[k], y[k], err_msg=f"{hosts} hosts, step {s}, {k!r}")
    # image_da (the un-augmented cifar view) identifies the example: no repeats inside an epoch, and
    # a new order each epoch.
    epochs = [[_hash(im) for b in ref[2 * e:2 * e + 2] for im in b["image_da"]] for e in range(3)]
    assert all(len(set(e)) == 2 * gbs for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # The per-example rng follows the global position, so the random crops differ from a reseeded run.
    other = _concat_hosts(cfg, gbs=gbs, hosts=2, steps=2, seed=1)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(ref, other))


def test_tfds_host_sharding_covers_each_example_once_per_epoch():
  """Across hosts, every example appears exactly once per epoch (N divisible by B), reshuffled per epoch,
  and each host holds a contiguous slice of the global batch. (Replaces the old per-host assertion that a
  host sees the same fixed shard every epoch: hosts now slice one global permutation per epoch.)"""
  n, hosts, gbs = 12, 2, 4  # 3 global batches of 4 per epoch, 2 per host per step
  with tfds.testing.mock_data(num_examples=n):
    cfg = _cifar_cfg("none")
    everything = {_hash(pipeline.make_source(cfg, "train")[i]["image"]) for i in range(n)}
    assert len(everything) == n
    per_host = [_take(pipeline.make_train_loader(cfg, global_batch_size=gbs, seed=0, process_index=h,
                                                 process_count=hosts), 6) for h in range(hosts)]
  assert per_host[0][0]["image"].shape[0] == gbs // hosts
  epochs = []
  for e in range(2):
    hashes = [_hash(im) for s in range(3 * e, 3 * e + 3) for h in range(hosts)
              for im in per_host[h][s]["image"]]
    assert len(hashes) == n and set(hashes) == everything  # each example exactly once per epoch
    epochs.append(hashes)
  assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_state_restore_continues_identically(tmp_path):
  cfg = data_config.digits_config(16, 1)
  it = pipeline.make_train_loader(cfg, global_batch_size=8, seed=3)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = pipeline.make_train_loader(cfg, global_batch_size=8, seed=3)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # The same through orbax with grain's handler (what the trainer's checkpoint.py uses).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_loader(cfg, global_batch_size=8, seed=3)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": checkpointing.handler()}) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=checkpointing.save_args(it)))
    mngr.wait_until_finished()
    restored = pipeline.make_train_loader(cfg, global_batch_size=8, seed=3)
    mngr.restore(3, args=ocp.args.Composite(data=checkpointing.restore_args(restored)))
  for x, y in zip(expected, _take(restored, 3)):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # Resuming on another host count: the 1-host state set on 2 hosts continues the same global batches.
  for x, y in zip(expected, _concat_hosts(cfg, gbs=8, hosts=2, steps=3, seed=3, state=state)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_folder_pipeline_with_corrupt_file(tmp_path):
  make_folder(tmp_path / "data" / "train")
  cfg = data_config.default_config()
  cfg.update(dict(source="folder", data_dir=str(tmp_path / "data"), train_split="train",
                  eval_split="train", image_size=16, channels=3, train_transform="imagenet",
                  eval_transform="imagenet", resize_size=18))
  source = pipeline.make_source(cfg, "train")
  it = pipeline.make_train_loader(cfg, global_batch_size=4, seed=0, source=source)
  batches = _take(it, 4)  # two epochs of 8 files, no crash
  assert batches[0]["image"].shape == batches[0]["image_da"].shape == (4, 16, 16, 3)
  assert source.num_bad >= 1 and any(f.endswith("c1_broken.jpg") for f in source.bad_files)
  ev = pipeline.make_eval_loader(cfg, global_batch_size=3)
  got = list(ev)
  assert ev.num_examples == 8 and len(got) == ev.num_batches == 3
  assert got[0]["image"].shape == (3, 16, 16, 3)
  # Evaluation leaves the unreadable file out (mask 0) instead of scoring its neighbour twice.
  real = [im for b in got for im, m in zip(b["image"], b["mask"]) if m]
  assert len(real) == 7 and len({im.tobytes() for im in real}) == 7


def test_wrong_path_fails_before_iterating(tmp_path):
  cfg = data_config.default_config()
  cfg.update(dict(source="folder", data_dir=str(tmp_path / "missing_root")))
  with pytest.raises(FileNotFoundError, match="missing_root"):
    pipeline.make_train_loader(cfg, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_train_loader(data_config.default_config(), global_batch_size=5, seed=0,
                               process_count=2)
  with pytest.raises(ValueError, match="fewer than global_batch_size 2000"):  # < 1 batch per epoch
    pipeline.make_train_loader(data_config.digits_config(8, 1), global_batch_size=2000, seed=0)


def test_eval_loader_padding_and_host_shards():
  cfg = data_config.digits_config(8, 1)
  single = pipeline.make_eval_loader(cfg, global_batch_size=100)
  batches = list(single)
  assert single.num_examples == 364 and len(batches) == 4
  assert [int(b["mask"].sum()) for b in batches] == [100, 100, 100, 64]
  assert np.all(batches[-1]["image"][64:] == 0) and batches[-1]["mask"].dtype == np.int32
  again = list(single)  # re-iterable, same order
  np.testing.assert_array_equal(batches[1]["image"], again[1]["image"])
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(labels, single.source.labels)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                np.concatenate([np.arange(364), np.full(36, -1)]))
  # Two hosts: host h reads block h of every global batch, so the global batches (host blocks side by side)
  # are the one-host batches row for row: each example keeps its row, and per-row noise with it.
  hosts = [pipeline.make_eval_loader(cfg, global_batch_size=100, process_index=h, process_count=2)
           for h in range(2)]
  assert hosts[0].num_batches == hosts[1].num_batches == 4 and hosts[0].batch_size == 50
  for one, parts in zip(batches, zip(*[list(h) for h in hosts])):
    for k in ("image", "label", "mask", "index"):
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), one[k])


def test_augmix_hook():
  calls = []

  def augmix_fn(image, rng):
    calls.append(image.shape)
    return np.clip(image.astype(np.int32) + int(rng.integers(1, 50)), 0, 255).astype(np.uint8)

  it = pipeline.make_train_loader(data_config.digits_config(16, 3), global_batch_size=4, seed=0,
                                  augmix_fn=augmix_fn)
  b = next(it)
  assert b["image_aug1"].shape == b["image_aug2"].shape == b["image"].shape == (4, 16, 16, 3)
  assert calls and not np.array_equal(b["image_aug1"], b["image_aug2"])
  from diffaug_jax.data import augmix  # pylint: disable=g-import-not-at-top
  cfg = data_config.digits_config(16, 1)
  b = next(pipeline.make_train_loader(cfg, global_batch_size=4, seed=0,
                                      augmix_fn=augmix.make_augmix_fn(cfg)))
  assert b["image_aug1"].shape == (4, 16, 16, 1) and b["image_aug1"].dtype == np.uint8


@pytest.mark.slow
def test_neighbouring_seeds_do_not_share_epoch_orders():
  """grain reseeds each epoch's shuffle from (seed + epoch): fed our seed directly, seed 1's epoch e would be
  seed 0's epoch e + 1, and multi-seed runs would see the same data orders shifted by one epoch."""
  n = 50
  orders = {s: pipeline._GlobalIndex(n, 10, 10, 0, s) for s in range(4)}  # pylint: disable=protected-access

  def epoch(s, e):
    return [orders[s](e * (n // 10) * 10 + j, None)[0] for j in range(n)]

  for s in range(3):
    assert sorted(epoch(s, 0)) == list(range(n))  # each epoch is a permutation
    for e in range(3):
      assert epoch(s + 1, e) != epoch(s, e + 1) and epoch(s + 1, e) != epoch(s, e)


def test_readers_prefetch_a_few_batches_not_hundreds():
  """An element of the read stage is a whole host batch (the batch is formed before reading): the default
  prefetch must hold a few of them, not ~128 (~80 GB of ImageNet host batches on 8 workers)."""
  import time
  from diffaug_jax.data import sources

  class Counting(sources.DigitsSource):
    loads = 0

    def _load(self, index):
      Counting.loads += 1
      return super()._load(index)

  for cfg in (data_config.digits_config(8, 1), data_config.imagenet_config(data_dir="")):
    assert int(cfg.prefetch_buffer_size) <= 2 * int(cfg.read_threads), cfg.prefetch_buffer_size
  cfg = data_config.digits_config(8, 1)
  Counting.loads = 0
  it = pipeline.make_train_loader(cfg, global_batch_size=8, seed=0, source=Counting("train", image_size=8))
  next(it)
  time.sleep(0.5)  # the reader threads fill the prefetch buffer behind the first batch
  assert 8 <= Counting.loads <= 8 * (1 + int(cfg.prefetch_buffer_size) + int(cfg.read_threads)), Counting.loads


def test_workers_outside_an_absl_app_parse_flags_first(monkeypatch):
  """grain's worker processes read absl flags: a library caller without app.run (a notebook) got
  UnparsedFlagAccessError at the first batch. The loader marks them parsed (defaults) when it starts workers."""
  from absl import flags
  marked = []

  class Unparsed:  # (absl's FlagValues takes attribute writes as flag values: stand in for the object)
    def is_parsed(self):
      return bool(marked)

    def mark_as_parsed(self):
      marked.append(1)

  monkeypatch.setattr(flags, "FLAGS", Unparsed())
  ds = pipeline.make_train_dataset(data_config.digits_config(8, 1), global_batch_size=8, seed=0, num_workers=0)
  assert not marked  # in-process: nothing to do
  pipeline._maybe_workers(ds, data_config.digits_config(8, 1), 2)  # pylint: disable=protected-access
  assert marked == [1]


def test_workers_give_the_same_batches_as_in_process():
  cfg = data_config.digits_config(16, 1)
  ref = _take(pipeline.make_train_loader(cfg, global_batch_size=8, seed=5), 3)
  it = pipeline.make_train_loader(cfg, global_batch_size=8, seed=5, num_workers=2)
  try:
    got = _take(it, 3)
  finally:
    del it
  for x, y in zip(ref, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


class DiffaugTinyTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A real (not mocked) TFDS dataset, prepared as array_record WITHOUT TensorFlow: images are given as
  PNG bytes, so TFDS needs no TF encoder. Record 7 of "train" holds bytes that are not an image."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(10, bad=7), "test": self._generate_examples(5)}

  def _generate_examples(self, n, bad=None):
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(n)
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
      yield i, {"image": b"not an image" if i == bad else buf.getvalue(), "label": i % 3}


def test_real_prepared_tfds_data_dir_without_tensorflow(tmp_path):
  data_dir = str(tmp_path / "tfds")
  DiffaugTinyTfds(data_dir=data_dir, file_format="array_record").download_and_prepare()
  cfg = data_config.default_config()
  cfg.update(dict(source="tfds", name=DiffaugTinyTfds.name, data_dir=data_dir, train_split="train",
                  eval_split="test", image_size=16, channels=3, train_transform="imagenet",
                  eval_transform="imagenet", resize_size=18, read_threads=2))
  assert data_config.num_classes(cfg) == 3
  source = pipeline.make_source(cfg, "train")
  batches = _take(pipeline.make_train_loader(cfg, global_batch_size=5, seed=0, source=source), 2)
  assert batches[0]["image"].shape == (5, 16, 16, 3) and batches[0]["label"].dtype == np.int32
  # num_bad counts failed reads (prefetching may already have read the next epoch); bad_files is unique.
  assert source.num_bad >= 1 and len(source.bad_files) == 1
  assert source.bad_files[0].startswith("tfds:diffaug_tiny_tfds/train[")
  ev = pipeline.make_eval_loader(cfg, global_batch_size=4)
  got = list(ev)
  assert ev.num_examples == 5 and [int(b["mask"].sum()) for b in got] == [4, 1]
  with pytest.raises(FileNotFoundError, match="split 'validation'"):
    pipeline.make_source(cfg, "validation")


class DiffaugTinyPrepare(DiffaugTinyTfds):
  """Registered (by name) so the prepare command can find it, like a stock TFDS dataset."""


def test_prepare_command_writes_array_record(tmp_path, capsys):
  from diffaug_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepare.main(["diffaug_tiny_prepare", "--data_dir", str(tmp_path)])
  assert "prepared diffaug_tiny_prepare" in capsys.readouterr().out
  src = pipeline.make_source(_tfds_cfg("diffaug_tiny_prepare", str(tmp_path)), "test")
  assert len(src) == 5 and src[0]["image"].dtype == np.uint8
  # Clear errors, before any download: a corrupted-set name without its config, a misspelled name.
  for name, msg in (("cifar10_corrupted", "cifar10_corrupted/gaussian_noise_5"),
                    ("diffaug_tiny_prepar", "Did you mean")):
    with pytest.raises(SystemExit):
      prepare.main([name, "--data_dir", str(tmp_path)])
    assert msg in capsys.readouterr().err


def _tfds_cfg(name, data_dir):
  cfg = data_config.default_config()
  cfg.update(dict(source="tfds", name=name, data_dir=data_dir, image_size=16, channels=3))
  return cfg
