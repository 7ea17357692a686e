"""An imported ADM teacher distilled like a trained one: converted from both
published layouts, a 2-step CD student distilled from it on 8 devices,
evaluated with the FID protocol, resumed; and the teacher loader's one-line
errors."""

import hashlib
import json

import jax
import numpy as np
import pytest

from configs import edm_imagenet64
from multistep_cm import adm
from multistep_cm import models
from multistep_cm import schedules
from multistep_cm import train
from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm import weights
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from multistep_cm.datasets import tfds_images
from multistep_cm.evaluation import evaluate as evaluation
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import quick
from multistep_cm.tools import convert_adm
from tests import test_adm
from tests import test_evaluation

torch = pytest.importorskip('torch')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(npz path, ADMConfig): a random diffusers UNet2DModel of the smoke
  config, converted from its directory and from OpenAI's layout of the same
  weights, which give the same file."""
  root = tmp_path_factory.mktemp('imported')
  cfg = run_lib.resolve(edm_imagenet64.get_config('smoke')).model.config
  model = test_adm.random_model(cfg, seed=5)
  model.save_pretrained(root / 'unet', safe_serialization=True)
  from_diffusers = root / 'diffusers.npz'
  convert_adm.main([f'--diffusers={root}', f'--out={from_diffusers}'])
  torch.save(test_adm.openai_state_dict(model.state_dict(), cfg),
             root / 'model.pt')
  from_openai = root / 'openai.npz'
  convert_adm.main(
      [f'--openai={root / "model.pt"}', '--preset=openai_imagenet64',
       f'--num_channels={cfg.model_channels}', '--channel_mult=1,2',
       f'--num_res_blocks={cfg.num_res_blocks}', '--attention_resolutions=32',
       f'--num_head_channels={cfg.num_head_channels}', f'--out={from_openai}'])
  assert (hashlib.sha256(from_openai.read_bytes()).hexdigest() ==
          hashlib.sha256(from_diffusers.read_bytes()).hexdigest())
  return from_diffusers, cfg


@pytest.mark.usefixtures('eigen_frechet')
def test_a_converted_teacher_distils_evaluates_and_resumes(
    converted, tmp_path, monkeypatch):
  npz, _ = converted
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, (64, 64, 3), np.uint8),
               'label': i % 1000} for i in range(8)]
  monkeypatch.setattr(tfds_images.TfdsImages, '_source',
                      lambda self, split: examples)
  config = edm_imagenet64.get_config(f'cd,steps=2,smoke,teacher={npz}')
  config.total_steps, config.ckpt_every, config.optim.warmup_steps = 1, 1, 1
  ev = config.evaluate
  ev.inception_weights = str(tmp_path / 'inception.npz')
  ev.inception_sha256 = test_evaluation.random_inception_npz(
      ev.inception_weights)
  ev.batch_size = ev.num_samples = ev.chunk_size = 8
  ev.train_samples = 0
  ev.precision_recall = False
  ev.reference = fid.compute_reference(config, str(tmp_path / 'refs'))

  workdir = str(tmp_path / 'cd_s2')
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 1
  record = evaluation.run(config, workdir)
  assert np.isfinite(record['metrics']['fid'])
  assert (record['sampler'], record['steps'], record['nfe']) == (
      'student', 2, 2)

  config.total_steps = 2
  resumed, _ = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 2
  # The student started as the teacher (step 0's learning rate is 0), and
  # its step from the checkpoint moved it from there.
  teacher = adm.load_weights(npz)[1]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(resumed.params[adm.UNET]), teacher)
  assert 0 < max(jax.tree.leaves(moved)) < 1e-2
  log = json.loads((tmp_path / 'cd_s2' / 'config.json').read_text())
  assert log['teacher_checkpoint'] == str(npz)


def test_the_teacher_loader_refuses_what_does_not_fit(converted, tmp_path):
  npz, _ = converted
  wider = edm_imagenet64.get_config(f'cd,smoke,teacher={npz}')
  wider.model.model_channels = 64
  wider_run = run_lib.resolve(wider)
  with pytest.raises(weights.WeightsError) as e:
    state_lib.load_teacher(wider_run)
  assert 'does not fit config.model' in str(e.value)
  assert '\n' not in str(e.value)
  other = tmp_path / 'other.npz'
  np.savez(other, x=np.zeros(3))
  config = edm_imagenet64.get_config(f'cd,smoke,teacher={other}')
  run = run_lib.resolve(config)
  with pytest.raises(weights.WeightsError, match='not written by'):
    state_lib.load_teacher(run)
  config.teacher_checkpoint = str(tmp_path / 'missing.npz')
  run = run_lib.resolve(config)
  with pytest.raises(errors.UserError, match='Cannot read'):
    state_lib.load_teacher(run)
  # Found missing before anything is written or compiled.
  with pytest.raises(errors.ConfigError, match='missing.npz: no such file'):
    stages.get('cd').check(run)


def test_an_any_s_student_starts_exactly_as_the_imported_teacher(converted):
  """The converted U-Net's weights, under their own names, and a boundary
  embedding beside it whose output is zero: given any boundary, the any-S
  student's network is the teacher's."""
  npz, _ = converted
  run = run_lib.resolve(edm_imagenet64.get_config(f'cd,any,smoke,teacher={npz}'))
  params = state_lib.load_teacher(run)
  assert set(params) == {adm.UNET, models.BOUNDARY}
  teacher = adm.load_weights(npz)[1]
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(params[adm.UNET]), teacher)
  teacher_run = run_lib.resolve(
      edm_imagenet64.get_config(f'cd,smoke,teacher={npz}'))
  assert set(state_lib.load_teacher(teacher_run)) == {adm.UNET}
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
  t, labels = np.array([0.3, 0.9], np.float32), np.array([1, 7], np.int32)
  want = run.network({adm.UNET: params[adm.UNET]}, z, t, labels)
  for boundary in (np.zeros(2, np.float32), t / 2):
    np.testing.assert_array_equal(
        run.network(params, z, t, labels, boundary=boundary), want)


def test_openai_networks_have_no_null_class_to_guide():
  config = edm_imagenet64.get_config('cd,smoke,teacher=t.npz')
  config.consistency.guidance = 1.
  from multistep_cm.core import validation  # pylint: disable=g-import-not-at-top
  run = run_lib.resolve(config)
  with pytest.raises(errors.ConfigError, match='no null class'):
    validation.check_config(run, train=False)
  config.consistency.guidance = 0.
  config.model.num_head_channels = 128  # Wider than the 64 channels at 32x32.
  with pytest.raises(errors.ConfigError, match='^config.model: ADM attention'):
    validation.check_config(run_lib.resolve(config), train=False)


def test_a_published_student_samples_from_its_weights_alone(converted,
                                                            tmp_path):
  """`student=PATH.npz`: the network in the consistency models' output form,
  sampled as S = 1 with no checkpoint in the workdir; at sigma_min it is the
  identity (c_skip 1, c_out 0), whatever the weights."""
  npz, _ = converted
  config = edm_imagenet64.get_config(f'cd,steps=1,smoke,student={npz}')
  png, samples = quick.write_samples(config, str(tmp_path), 4)
  with np.load(samples) as f:
    assert f['arr_0'].shape == (4, 64, 64, 3) and f['arr_0'].dtype == np.uint8
  assert png.exists()
  run = run_lib.resolve(config)
  model = run.model
  assert model.preconditioning == 'consistency'
  params, _ = state_lib.load_imported(run, str(npz))
  z = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  labels = np.array([1, 2])
  network = models.network_fn(model)
  at_min = network(params, z, 0., labels)  # t = 0: sigma = sigma_min.
  logsnr = float(schedules.get_logsnr_fn(**config.schedule)(0.))
  alpha, sigma = (float(a) for a in schedules.alpha_sigma(logsnr))
  # D(x) = x at sigma_min, so v = (alpha z - z / alpha) / sigma.
  np.testing.assert_allclose(at_min, (alpha * z - z / alpha) / sigma,
                             rtol=1e-4, atol=1e-4)
