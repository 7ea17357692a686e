"""Rates and ETAs for the long loops (training, sampling, statistics)."""

import time


class Progress:
  """Steps per second and ETA between log points."""

  def __init__(self, start_step, total_steps):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.time()

  def update(self, step):
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    return rate, eta


def format_eta(seconds):
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
