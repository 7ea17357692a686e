"""Your captioned images (`captioned_images`): images with precomputed caption
embeddings in `config.dataset.text_dir` (the format of `text_data`),
conditioned on the captions alone; evaluated on `config.evaluate.prompts`
(else the training captions), sample i drawn for caption i mod N, scored by
the FID Inception and, when configured, the CLIP score."""

import numpy as np

from multistep_cm import conditioning
from multistep_cm import errors
from multistep_cm.datasets import base
from multistep_cm.datasets import text_data


class CaptionedImages(base.Dataset):
  scorer = 'inception_clip'

  @property
  def condition(self):
    return conditioning.Captions(self.cfg.text_len, self.cfg.text_dim,
                                 self.cfg.pooled_dim)

  def _expected(self):
    """What the directory must hold for the config: text_data's checks."""
    return dict(image_size=self.cfg.image_size, channels=self.cfg.channels,
                text_len=self.cfg.text_len, text_dim=self.cfg.text_dim,
                pooled_dim=self.cfg.pooled_dim)

  def open(self):
    """The training data, checked against the config's sizes."""
    if not self.cfg.get('text_dir'):
      raise errors.ConfigError(
          f'Dataset {self.cfg.name!r} reads config.dataset.text_dir: set it '
          'to a directory written by multistep_cm.tools.write_text_data.')
    return text_data.open_dataset(self.cfg.text_dir, **self._expected())

  def check(self):
    self.open()

  def train_batches(self, global_batch, seed, start_step, rows):
    self.check()  # Before the first batch is asked for.
    condition = self.condition
    batches = text_data.train_batches(self.cfg.text_dir, global_batch, seed,
                                      start_step, rows, **self._expected())
    return base.prefetched(
        {'x': r['x'], 'cond': condition.make(r['text'], r['text_mask'],
                                             r.get('pooled'))}
        for r in batches)

  def split_batches(self, split, process_index, process_count, local_batch):
    del split  # One directory: its examples are the split.
    ds = self.open()
    idx = base.split_share(len(ds), process_index, process_count)
    for i in range(0, len(idx), local_batch):
      r = ds.rows(idx[i:i + local_batch])
      yield r['x'], r['label']

  def num_examples(self, split):
    del split
    return len(self.open())

  def eval_captions(self):
    """The evaluation captions: config.evaluate.prompts, else the training
    data's, checked against the config's text sizes."""
    d = self.cfg
    return text_data.open_dataset(
        self.config.evaluate.get('prompts') or d.text_dir, text_len=d.text_len,
        text_dim=d.text_dim, pooled_dim=d.pooled_dim)

  def eval_labels(self, n):
    """The index of each sample's caption: i mod the number of captions."""
    return (np.arange(n) % len(self.eval_captions())).astype(np.int32)

  def eval_cond(self, labels):
    r = self.eval_captions().conditioning(labels)
    return self.condition.make(r['text'], r['text_mask'], r.get('pooled'))

  @property
  def grid_columns(self):
    return 0

  @property
  def label_description(self):
    return ('sample i is drawn for evaluation caption i mod N '
            '(config.evaluate.prompts, else the training captions); labels '
            'are those caption indices')
