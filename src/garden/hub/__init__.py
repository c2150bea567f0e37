"""The Hub source: a checkpoint series on the Hugging Face Hub, or any server speaking its API, read one
tensor at a time by HTTP range requests. In layers, each on those before it:

- `transport`: one repository's server: range reads, retries with backoff, error answers in words;
- `manifest`: what the server told garden, kept on disk so that a second run asks nothing again;
- `identity`: which file holds a tensor and what it is (LFS sha256, git blob id or ETag), downloads
  verified against that;
- `ranges`: tensors cut out of remote files by range reads (formats in `garden.formats`);
- `series`: `HubSeries`, the checkpoint series composed of them.
"""

from garden.hub.identity import RemoteFile
from garden.hub.series import HubSeries, default_cache_dir

__all__ = ["HubSeries", "RemoteFile", "default_cache_dir"]
