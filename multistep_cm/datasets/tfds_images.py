"""Class-conditional images prepared with tfds (ImageNet 64 and 128,
CIFAR-10), read by index from array_record files (`tfds_source`), with
random horizontal flips drawn per global row; scored by the FID
Inception."""

import itertools


from multistep_cm.datasets import base
from multistep_cm.datasets import tfds_source


class TfdsImages(base.Dataset):
  """The tfds dataset `tfds_name`; `crop`: centre square crop and area
  resize (imagenet2012 at 128), else the images are stored at their size."""

  def __init__(self, config, tfds_name, crop=False):
    super().__init__(config)
    self.tfds_name, self.crop = tfds_name, crop

  def _source(self, split):
    return tfds_source.open_source(self.tfds_name, split, self.cfg.data_dir)

  def check(self):
    self._source('train')

  def train_batches(self, global_batch, seed, start_step, rows):
    source = self._source('train')

    def batches():
      for step in itertools.count(start_step):
        idx = base.step_indices(len(source), global_batch, seed, step, rows)
        flips = ([(seed, step, r) for r in range(rows.start, rows.stop)]
                 if self.cfg.flip else None)
        x, y = tfds_source.load_rows(source, idx, self.cfg.image_size, flips,
                                     self.crop)
        yield {'x': x, 'cond': y}
    return base.prefetched(batches())

  def split_batches(self, split, process_index, process_count, local_batch):
    source = self._source(split)
    idx = base.split_share(len(source), process_index, process_count)
    for i in range(0, len(idx), local_batch):
      yield tfds_source.load_rows(source, idx[i:i + local_batch],
                                  self.cfg.image_size, crop=self.crop)

  def num_examples(self, split):
    return len(self._source(split))

