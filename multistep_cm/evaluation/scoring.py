"""How samples are scored, in one table: each dataset names its scorer
(`datasets.base.Dataset.scorer`), a row here with its metrics, their names,
and what real data scores (the floor).

  digits_classifier  FD-digits and class accuracy of the digits classifier;
                     the floor is the held-out digits
  digit_captions     the same, plus the agreement of each sample with the
                     trait its prompt names (thin/thick, upright/slanted)
  gaussian_mixture   sliced Wasserstein distance to the true mixture and
                     mean true log-density; the floor is fresh true samples
  inception          FID, Inception Score and precision/recall of the FID
                     Inception against a reference (config.evaluate), and
                     FD-DINOv2 where DINOv2 weights are configured
  inception_clip     the same, and the CLIP score of each sample against
                     its caption when CLIP weights are configured

A scorer that `needs_many_samples` (FID) means nothing on the few samples of
the quick evaluation: there it scores nothing, and its numbers come from
--mode=evaluate and FID during training. To add a scorer: a `Scorer` and
`register(name, cls)`. Reports name metrics by `Scorer.metrics`.
"""

import dataclasses

from absl import logging
import numpy as np

from multistep_cm import weights as weights_lib
from multistep_cm.datasets import captioned_digits
from multistep_cm.evaluation import clip
from multistep_cm.evaluation import digits_classifier
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import fid
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

  Built as `Scorer(run)` (the resolved config, `run.Run`: its config, mesh
  and dataset). `score(outputs, labels)` reads the
  generator outputs named in `inputs` ('samples': floats in [-1, 1] or uint8
  images, or 2-D points; 'features', 'logits': what `features` computed on
  the devices); `labels` are the dataset's `eval_labels`, sample i first.
  """
  needs_many_samples = False
  # Whether it compares with config.evaluate.reference: a reference set for
  # one that does not is an error, not silently ignored.
  reads_reference = False
  metrics = ()
  floor_label = ''
  inputs = ('samples',)
  # (feature_params, uint8 images) -> dict, run in the sampler's jit.
  features = None
  feature_params = None

  def __init__(self, run=None):
    del run

  def score(self, outputs, labels):
    del outputs, labels
    return {}

  def floor(self):
    """The scores of real data: the best a model can hope for."""
    return {}

  def unreported(self, num_samples):
    """{metric key: why} for the metrics that `num_samples` samples are too
    few to score."""
    del num_samples
    return {}

  def record(self):
    """What `protocol.json` notes about the scorer's own inputs."""
    return {}


class Digits(Scorer):
  metrics = (Metric('fd_digits', 'FD-digits', True, log_scale=True),
             Metric('class_accuracy', 'class accuracy', False))
  floor_label = 'real held-out digits'

  def score(self, outputs, labels):
    return digits_classifier.evaluate(_floats(outputs['samples']), labels)

  def floor(self):
    return digits_classifier.floor()

  def unreported(self, num_samples):
    n = digits_classifier.FD_CHUNK
    if num_samples >= n:
      return {}
    return {'fd_digits': f'needs at least {n} samples, the held-out split\'s '
                         'size its statistics are compared at; there are '
                         f'{num_samples}'}


def _floats(x):
  """Samples as floats in [-1, 1], from uint8 or floats."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.
  return x


class DigitCaptions(Digits):
  """The digits classifier's scores against the class each prompt names,
  and `trait_agreement`: the share of samples whose thickness or slant,
  measured as the captions measure the training images (against the
  medians of the named class), is the one their prompt names."""
  metrics = Digits.metrics + (Metric('trait_agreement', 'trait agreement',
                                     False),)

  def score(self, outputs, labels):
    x = _floats(outputs['samples'])
    scores = digits_classifier.evaluate(x, labels)
    trait, value = captioned_digits.prompt_traits(len(labels))
    measured = captioned_digits.measure_traits(x, labels)
    got = np.where(trait == 'thickness', measured['thickness'],
                   measured['slant'])
    scores['trait_agreement'] = float(np.mean(got == value))
    return scores


class Toy2d(Scorer):
  metrics = (Metric('swd', 'sliced Wasserstein distance', True,
                    log_scale=True),
             Metric('log_density', 'mean true log-density', False))
  floor_label = 'true samples'

  def __init__(self, run):
    self.floor_samples = run.config.train_eval.num_samples

  def score(self, outputs, labels):
    del labels  # The mixture's components are equally likely.
    return metrics_lib.toy2d_metrics(outputs['samples'])

  def floor(self):
    return metrics_lib.toy2d_floor(self.floor_samples)


class Inception(Scorer):
  """FID, IS and precision/recall against `config.evaluate.reference`, and
  FD-DINOv2 when config.evaluate.dinov2_weights is set; the weights and the
  reference are read and checked when it is built, before anything is
  sampled."""
  needs_many_samples = True
  reads_reference = True
  metrics = (Metric('fid', 'FID', True), Metric('inception_score', 'IS', False),
             Metric('precision', 'precision', False),
             Metric('recall', 'recall', False))
  inputs = ('features', 'logits')

  def __init__(self, run):
    config, mesh = run.config, run.mesh
    ev = config.evaluate
    self.detectors = fid.Detectors(config)
    self.feature_params = self.detectors.params
    self.features = self.detectors.outputs
    self.reference = fid.load_reference(ev.reference)
    self.ref_stats = fid.reference_stats(self.reference, self.detectors, mesh,
                                         ev.batch_size)
    self.ref_features = fid.reference_features(self.reference, self.detectors,
                                               mesh, config)
    if 'fd_dinov2' in self.detectors.metrics:
      self.inputs = Inception.inputs + ('dinov2',)
      self.metrics = Inception.metrics[:1] + (
          Metric('fd_dinov2', 'FD-DINOv2', True),) + Inception.metrics[1:]

  def score(self, outputs, labels):
    del labels
    return fid.scores(outputs, self.ref_stats, self.ref_features)

  def record(self):
    ref, d = self.reference, self.detectors
    out = {
        'reference': {'path': ref.path, 'sha256': ref.sha256, 'statistics': {
            m: 'from the file' if m in ref.stats else 'computed from its arr_0'
            for m in d.metrics}},
        'inception': {
            'weights': d.inception_weights, 'sha256': d.inception_sha256,
            'input': 'uint8 -> TF1 bilinear resize to 299 (no half-pixel '
                     'centres) -> (x - 128) / 128; HIGHEST precision',
            'logits': '1008-way, without the output bias'}}
    if 'fd_dinov2' in d.metrics:
      out['dinov2'] = {
          'weights': d.dinov2_weights, 'sha256': d.dinov2_sha256,
          'input': dinov2.PREPROCESSING,
          'features': 'class token after the final norm (1024-d for '
                      'ViT-L/14); HIGHEST precision'}
    return out


class TextImages(Inception):
  """FID and the rest as `Inception`, plus the CLIP score (the paper's Table
  6 scale: the mean clamped cosine) of each sample against the caption it
  was drawn for, from config.evaluate's clip_weights and clip_tokens, which
  must hold the evaluation captions in order. Without clip_weights, no CLIP
  score (one log line)."""

  def __init__(self, run):
    super().__init__(run)
    ev = run.config.evaluate
    self.clip_sha256 = None
    if not ev.get('clip_weights'):
      logging.info('No CLIP score: set config.evaluate.clip_weights and '
                   'clip_tokens for it.')
      return
    weights = clip.load_weights(ev.clip_weights, ev.clip_sha256)
    prompts, tokens = clip.load_tokens(ev.clip_tokens)
    captions = run.dataset.eval_captions()
    expected = captions.captions(range(len(captions)))
    if prompts != expected:
      first = next((i for i, (a, b) in enumerate(zip(prompts, expected))
                    if a != b), min(len(prompts), len(expected)))
      raise weights_lib.WeightsError(
          f'The CLIP tokens in {ev.clip_tokens} are of other captions than '
          f'the evaluation captions ({len(prompts)} vs {len(expected)}; they '
          f'differ first at caption {first}): tokenize those captions with '
          'convert_clip --prompts.')
    self.clip_sha256 = weights.sha256
    self.text_features = np.asarray(
        clip.text_features(weights.params, tokens, weights.config))
    clip_config = weights.config
    self.feature_params = {**self.feature_params, 'clip': weights.params}
    self.features = lambda p, x: {
        **self.detectors.outputs({k: v for k, v in p.items() if k != 'clip'},
                                 x),
        'clip': clip.image_features(p['clip'], x, clip_config)}
    self.inputs += ('clip',)
    self.metrics += (Metric('clip_score', 'CLIP score', False),)

  def score(self, outputs, labels):
    scores = super().score(outputs, labels)
    if self.clip_sha256:
      scores['clip_score'] = clip.clip_score(outputs['clip'],
                                             self.text_features[labels])
    return scores

  def record(self):
    return {**super().record(), 'clip': {'sha256': self.clip_sha256}}


SCORERS = {'digits_classifier': Digits, 'digit_captions': DigitCaptions,
           'gaussian_mixture': Toy2d, 'inception': Inception,
           'inception_clip': TextImages}


def register(name, cls):
  """Adds (or replaces) the scorer `name`, a `Scorer` subclass."""
  SCORERS[name] = cls


def scorer_class(run):
  """The scorer class the run's dataset names."""
  name = run.dataset.scorer
  if name not in SCORERS:
    raise KeyError(f'Dataset {run.config.dataset.name!r} names scorer '
                   f'{name!r}, which is not in the table '
                   f'({", ".join(SCORERS)}).')
  return SCORERS[name]


def get(run, quick=False):
  """The dataset's scorer. `quick`: for the few samples of the quick
  evaluation, where a scorer that needs many samples scores nothing (FID
  comes from --mode=evaluate and `training_fid`)."""
  cls = scorer_class(run)
  if quick and cls.needs_many_samples:
    return Scorer()
  return cls(run)


def training_fid(run, param_shardings, spec):
  """FID during training, where the dataset's scorer is the Inception's and
  its weights and reference are configured; else None."""
  if not scorer_class(run).needs_many_samples:
    return None
  if not fid.TrainingFID.enabled(run.config):
    logging.info('No FID during training: set config.evaluate.'
                 'inception_weights and config.evaluate.reference for it.')
    return None
  return fid.TrainingFID(run, param_shardings, spec)
