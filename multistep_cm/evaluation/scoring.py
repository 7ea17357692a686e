"""How samples are scored, in one table: one scorer per kind of data, with
its metrics, their names, and what real data scores (the floor).

  digits  FD-digits and class accuracy of the digits classifier; the floor
          is the held-out digits
  toy2d   sliced Wasserstein distance to the true mixture and mean true
          log-density; the floor is fresh true samples
  images  FID, Inception Score and precision/recall of the FID Inception
          against a reference (config.evaluate): every tfds dataset
  text    the same, and the CLIP score of each sample against its caption
          when CLIP weights are configured (dataset `text`)

To add a dataset with a metric of its own: a `Scorer` and a row in SCORERS.
Reports (the pipeline's table, the sweep) name metrics by `Scorer.metrics`.
"""

import dataclasses

from absl import logging
import numpy as np

from multistep_cm.core import generation
from multistep_cm.evaluation import clip
from multistep_cm.evaluation import digits_classifier
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Metric:
  key: str
  label: str
  lower_is_better: bool
  log_scale: bool = False  # Plotted on a log axis: spans orders of magnitude.

  @property
  def heading(self):
    return f'{self.label} {"↓" if self.lower_is_better else "↑"}'


class Scorer:
  """Scores a set of generated samples; this base scores nothing.

  `score(outputs, labels)` reads the generator outputs named in `inputs`
  ('samples': floats in [-1, 1] or uint8 images, or 2-D points; 'features',
  'logits': what `features` computed on the devices).
  """
  metrics = ()
  floor_label = ''
  inputs = ('samples',)
  # (feature_params, uint8 images) -> dict, run in the sampler's jit.
  features = None
  feature_params = None

  def score(self, outputs, labels):
    del outputs, labels
    return {}

  def floor(self):
    """The scores of real data: the best a model can hope for."""
    return {}

  def record(self):
    """What `protocol.json` notes about the scorer's own inputs."""
    return {}


class Digits(Scorer):
  metrics = (Metric('fd_digits', 'FD-digits', True, log_scale=True),
             Metric('class_accuracy', 'class accuracy', False))
  floor_label = 'real held-out digits'

  def __init__(self, config):
    del config

  def score(self, outputs, labels):
    x = outputs['samples']
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 127.5 - 1.
    return digits_classifier.evaluate(x, labels)

  def floor(self):
    return digits_classifier.floor()


class Toy2d(Scorer):
  metrics = (Metric('swd', 'sliced Wasserstein distance', True,
                    log_scale=True),
             Metric('log_density', 'mean true log-density', False))
  floor_label = 'true samples'

  def __init__(self, config):
    self.floor_samples = config.train_eval.num_samples

  def score(self, outputs, labels):
    del labels  # The mixture's components are equally likely.
    return metrics_lib.toy2d_metrics(outputs['samples'])

  def floor(self):
    return metrics_lib.toy2d_floor(self.floor_samples)


class Inception(Scorer):
  """FID, IS and precision/recall against `config.evaluate.reference`; the
  weights and the reference are read and checked when it is built, before
  anything is sampled."""
  metrics = (Metric('fid', 'FID', True), Metric('inception_score', 'IS', False),
             Metric('precision', 'precision', False),
             Metric('recall', 'recall', False))
  inputs = ('features', 'logits')
  features = staticmethod(fid.inception_outputs)

  def __init__(self, config, mesh):
    ev = config.evaluate
    self.feature_params, self.sha256 = inception.load_weights(
        ev.inception_weights, ev.inception_sha256)
    self.weights = inception.resolve_path(ev.inception_weights)
    self.reference = fid.load_reference(ev.reference)
    self.mu_sigma = fid.reference_stats(self.reference, self.feature_params,
                                        mesh, ev.batch_size)
    self.ref_features = fid.reference_features(
        self.reference, self.feature_params, mesh, config)

  def score(self, outputs, labels):
    del labels
    return fid.scores(outputs['features'], outputs['logits'], self.mu_sigma,
                      self.ref_features)

  def record(self):
    ref = self.reference
    return {
        'reference': {'path': ref.path, 'sha256': ref.sha256,
                      'statistics': 'file mu/sigma' if ref.mu is not None
                                    else 'computed from its arr_0'},
        'inception': {
            'weights': self.weights, 'sha256': self.sha256,
            'input': 'uint8 -> TF1 bilinear resize to 299 (no half-pixel '
                     'centres) -> (x - 128) / 128; HIGHEST precision',
            'logits': '1008-way, without the output bias'}}


class TextImages(Inception):
  """FID and the rest as `Inception`, plus the CLIP score (the paper's Table
  6 scale: the mean clamped cosine) of each sample against the caption it
  was drawn for, from config.evaluate's clip_weights and clip_tokens, which
  must hold the evaluation captions in order. Without clip_weights, no CLIP
  score (one log line)."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    ev = config.evaluate
    self.clip_sha256 = None
    if not ev.get('clip_weights'):
      logging.info('No CLIP score: set config.evaluate.clip_weights and '
                   'clip_tokens for it.')
      return
    weights = clip.load_weights(ev.clip_weights, ev.clip_sha256)
    prompts, tokens = clip.load_tokens(ev.clip_tokens)
    captions = generation.eval_captions(config)
    expected = captions.captions(range(len(captions)))
    if prompts != expected:
      first = next((i for i, (a, b) in enumerate(zip(prompts, expected))
                    if a != b), min(len(prompts), len(expected)))
      raise clip.ClipWeightsError(
          f'The CLIP tokens in {ev.clip_tokens} are of other captions than '
          f'the evaluation captions ({len(prompts)} vs {len(expected)}; they '
          f'differ first at caption {first}): tokenize those captions with '
          'convert_clip --prompts.')
    self.clip_sha256 = weights.sha256
    self.text_features = np.asarray(
        clip.text_features(weights.params, tokens, weights.config))
    clip_config = weights.config
    self.feature_params = {'inception': self.feature_params,
                           'clip': weights.params}
    self.features = lambda p, x: {
        **fid.inception_outputs(p['inception'], x),
        'clip': clip.image_features(p['clip'], x, clip_config)}
    self.inputs = Inception.inputs + ('clip',)
    self.metrics = Inception.metrics + (Metric('clip_score', 'CLIP score',
                                               False),)

  def score(self, outputs, labels):
    scores = super().score(outputs, labels)
    if self.clip_sha256:
      scores['clip_score'] = clip.clip_score(outputs['clip'],
                                             self.text_features[labels])
    return scores

  def record(self):
    return {**super().record(), 'clip': {'sha256': self.clip_sha256}}


# Built-in data has its own scorer; every other dataset (tfds images) is
# scored by the FID Inception.
# Captioned digits: the class each prompt names is the label to agree with.
SCORERS = {'digits': Digits, 'captioned_digits': Digits, 'toy2d': Toy2d}


def get(config, mesh=None, quick=False):
  """The dataset's scorer. `quick`: for the few samples of the quick
  evaluation, where FID means nothing: image datasets get the base scorer
  (their FID comes from --mode=evaluate and `training_fid`)."""
  if config.dataset.name in SCORERS:
    return SCORERS[config.dataset.name](config)
  if quick:
    return Scorer()
  return (TextImages if config.dataset.name == 'text' else Inception)(config,
                                                                      mesh)


def training_fid(config, network, param_shardings, mesh, spec):
  """FID during training, where the dataset is scored by the Inception and
  its weights and reference are configured; else None."""
  if config.dataset.name in SCORERS:
    return None
  if not fid.TrainingFID.enabled(config):
    logging.info('No FID during training: set config.evaluate.'
                 'inception_weights and config.evaluate.reference for it.')
    return None
  return fid.TrainingFID(config, network, param_shardings, mesh, spec)
