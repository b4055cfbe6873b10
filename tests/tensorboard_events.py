"""Reads a TensorBoard log folder's scalars as TensorBoard shows them (tests only).

Event files are TFRecord files: per record a little-endian uint64 length, a
4-byte CRC of it, the serialised `Event` proto, a 4-byte CRC of that. Files are
read in name order, as TensorBoard's directory loader does; a record cut short
(a killed writer) ends its file. A `SessionLog.START` event at step s hides
every earlier scalar with step >= s (TensorBoard's purge of orphaned data for
event files of version 2, the version tensorboardX writes).
"""
import os
import struct

from tensorboardX.proto import event_pb2


def _records(path: str):
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(data):
      return                                  # cut short by a killed writer
    yield data[offset + 12:offset + 12 + length]
    offset = end


def _events(logdir: str):
  """The events of every event file in `logdir`, in the order TensorBoard reads them."""
  for name in sorted(os.listdir(logdir)):
    if 'tfevents' in name:
      for record in _records(os.path.join(logdir, name)):
        yield event_pb2.Event.FromString(record)


def _is_restart(event) -> bool:
  return event.HasField('session_log') and event.session_log.status == event.session_log.START


def visible_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} in the order TensorBoard plots them."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for event in _events(logdir):
    if _is_restart(event):
      scalars = {tag: [(s, v) for s, v in points if s < event.step]
                 for tag, points in scalars.items()}
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def restart_steps(logdir: str) -> list[int]:
  """The steps of the `SessionLog.START` events, in the order TensorBoard reads them."""
  return [event.step for event in _events(logdir) if _is_restart(event)]
