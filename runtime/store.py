"""Where pt-serve's prefixes live: a store of prefix files by name, behind one small interface.

A store answers five questions, each about one name or one page, so that its cost does not
grow with the number of prefixes it holds: nothing here lists a whole store, except a page
listing, which a folder has to read in full (a client pages through `/v1/models` on its own
time, never the server at start).

  stat(name)        the file's version (or None when there is no such prefix), cheaply
  read(name)        its bytes and the version those bytes are
  put(name, data)   write it whole, atomically: a reader sees the old file or the new one
  delete(name)      remove it
  page(after, n)    the first n names after `after`, in the order of their file names

A version is an opaque string that changes whenever the file is replaced: in a folder, the
file's inode, modification time and size (files are only ever replaced by a rename, so one
inode is one content); in an object store, the object's ETag. A store that cannot be read at
all raises StoreUnavailable; the server answers that with 503 and keeps serving the prefixes
it holds.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from .files import atomic_write, remove_stale_temporaries

SUFFIX = ".npz"
log = logging.getLogger("prefixkit.store")


class StoreUnavailable(RuntimeError):
    """The store cannot be read or written right now (the message says why, in one sentence)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """One prefix file in a store: its name, version, last change (seconds since the epoch) and size."""

    name: str
    version: str
    modified: float
    size: int


class PrefixStore(Protocol):
    def stat(self, name: str) -> Stored | None: ...

    def read(self, name: str) -> tuple[bytes, Stored] | None: ...

    def put(self, name: str, data: bytes) -> Stored: ...

    def delete(self, name: str) -> bool: ...

    def page(self, after: str | None, limit: int) -> list[Stored]: ...

    def describe(self) -> str: ...


class FolderStore:
    """Prefix files `NAME.npz` in one folder. Uploads are written in its `.partial/` subfolder and
    renamed into place; what a killed upload left there is removed when the store opens."""

    PARTIAL = ".partial"

    def __init__(self, directory: str | os.PathLike, valid_name=None):
        self.directory = Path(directory)
        self.valid_name = valid_name or (lambda name: True)
        try:
            (self.directory / self.PARTIAL).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"the prefix folder {self.directory} cannot be used ({e.strerror or e}).") from None
        for name in remove_stale_temporaries(self.directory / self.PARTIAL):
            log.warning("removed %s, left by an upload that did not finish", self.directory / self.PARTIAL / name)

    def describe(self) -> str:
        return str(self.directory)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def stat(self, name: str) -> Stored | None:
        try:
            return self._stored(name, os.stat(self.path(name)))
        except FileNotFoundError:
            self._check_folder()
            return None
        except OSError as e:
            raise self._unavailable(e) from None

    def read(self, name: str) -> tuple[bytes, Stored] | None:
        try:
            with open(self.path(name), "rb") as f:  # the version of the inode actually read
                return f.read(), self._stored(name, os.fstat(f.fileno()))
        except FileNotFoundError:
            self._check_folder()
            return None
        except IsADirectoryError:
            return b"", Stored(name, "directory", 0.0, 0)  # refused as "not an .npz file" by the reader
        except OSError as e:
            raise self._unavailable(e) from None

    def put(self, name: str, data: bytes) -> Stored:
        self._check_folder()  # never re-create a folder that went away
        try:
            (self.directory / self.PARTIAL).mkdir(exist_ok=True)
            with atomic_write(self.path(name), temporary_dir=self.directory / self.PARTIAL) as f:
                f.write(data)
            return self._stored(name, os.stat(self.path(name)))
        except OSError as e:
            raise self._unavailable(e, "written") from None

    def delete(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
            return True
        except FileNotFoundError:
            self._check_folder()
            return False
        except OSError as e:
            raise self._unavailable(e, "written") from None

    def page(self, after: str | None, limit: int) -> list[Stored]:
        """Reads the whole folder (scandir: one system call per few hundred names) and keeps the
        first `limit` names after `after`, in the order of their file names."""
        start = None if after is None else after + SUFFIX
        try:
            with os.scandir(self.directory) as entries:
                files = (e.name for e in entries if e.name.endswith(SUFFIX) and (start is None or e.name > start))
                first = [f[: -len(SUFFIX)] for f in heapq.nsmallest(limit, files)]
                first = [n for n in first if self.valid_name(n)]
        except OSError as e:
            raise self._unavailable(e) from None
        return [s for s in (self._stat_quietly(n) for n in first) if s is not None]

    def _stat_quietly(self, name: str) -> Stored | None:
        try:
            return self._stored(name, os.stat(self.path(name)))
        except OSError:  # removed since the folder was read
            return None

    @staticmethod
    def _stored(name: str, st: os.stat_result) -> Stored:
        return Stored(name, f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}", st.st_mtime, st.st_size)

    def _check_folder(self) -> None:
        """A missing file is a missing prefix only while the folder itself is there."""
        try:
            if os.path.isdir(self.directory):
                return
        except OSError as e:
            raise self._unavailable(e) from None
        raise StoreUnavailable(f"the prefix folder {self.directory} is gone.")

    def _unavailable(self, error: OSError, done: str = "read") -> StoreUnavailable:
        return StoreUnavailable(f"the prefix folder {self.directory} cannot be {done} ({error.strerror or error}).")


class MemoryStore:
    """Uploads kept in memory, for a server without a prefix folder: they last until it stops."""

    def __init__(self):
        self._files: dict[str, tuple[bytes, Stored]] = {}
        self._lock = threading.Lock()
        self._count = 0

    def describe(self) -> str:
        return "memory"

    def stat(self, name: str) -> Stored | None:
        with self._lock:
            found = self._files.get(name)
        return None if found is None else found[1]

    def read(self, name: str) -> tuple[bytes, Stored] | None:
        with self._lock:
            return self._files.get(name)

    def put(self, name: str, data: bytes) -> Stored:
        with self._lock:
            self._count += 1
            stored = Stored(name, str(self._count), time.time(), len(data))
            self._files[name] = (bytes(data), stored)
        return stored

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._files.pop(name, None) is not None

    def page(self, after: str | None, limit: int) -> list[Stored]:
        start = None if after is None else after + SUFFIX
        with self._lock:
            files = heapq.nsmallest(limit, (n + SUFFIX for n in self._files if start is None or n + SUFFIX > start))
            return [self._files[f[: -len(SUFFIX)]][1] for f in files]


class S3Store:
    """Prefix objects `PATH/NAME.npz` in an S3 bucket, or any S3-compatible service, through
    boto3, AWS's own client: credentials, region and endpoint come from where every AWS tool
    reads them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials and
    config, AWS_ENDPOINT_URL for another service, an instance role). A PUT replaces an object
    whole, so readers see the old or the new one; versions are ETags. Every call gives up after
    `timeout_s` to connect, `timeout_s` to read, and `attempts` tries with backoff."""

    def __init__(self, url: str, valid_name=None, timeout_s: float = 3.0, attempts: int = 3):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable(f"{url}: an S3 store needs boto3: pip install 'prefixkit[s3]'.") from None
        bucket, _, path = url.removeprefix("s3://").partition("/")
        if not url.startswith("s3://") or not bucket:
            raise StoreUnavailable(f"{url}: give an object store as s3://BUCKET or s3://BUCKET/PATH.")
        self.url, self.bucket = url.rstrip("/"), bucket
        self.path = path.strip("/") + "/" if path.strip("/") else ""
        self.valid_name = valid_name or (lambda name: True)
        config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                        retries={"max_attempts": attempts, "mode": "standard"})
        self.client = boto3.session.Session().client("s3", config=config)
        self._call("read", self.client.list_objects_v2, Bucket=bucket, Prefix=self.path, MaxKeys=1)

    def describe(self) -> str:
        return self.url

    def key(self, name: str) -> str:
        return f"{self.path}{name}{SUFFIX}"

    def stat(self, name: str) -> Stored | None:
        head = self._call("read", self.client.head_object, Bucket=self.bucket, Key=self.key(name))
        if head is None:
            return None
        return Stored(name, head["ETag"], head["LastModified"].timestamp(), head["ContentLength"])

    def read(self, name: str) -> tuple[bytes, Stored] | None:
        got = self._call("read", self.client.get_object, Bucket=self.bucket, Key=self.key(name))
        if got is None:
            return None
        data = self._call("read", got["Body"].read)
        return data, Stored(name, got["ETag"], got["LastModified"].timestamp(), len(data))

    def put(self, name: str, data: bytes) -> Stored:
        done = self._call("written", self.client.put_object, Bucket=self.bucket, Key=self.key(name), Body=data)
        return Stored(name, done["ETag"], time.time(), len(data))

    def delete(self, name: str) -> bool:
        if self.stat(name) is None:  # S3 answers a delete the same whether the object was there or not
            return False
        self._call("written", self.client.delete_object, Bucket=self.bucket, Key=self.key(name))
        return True

    def page(self, after: str | None, limit: int) -> list[Stored]:
        found: list[Stored] = []
        ask = {"Bucket": self.bucket, "Prefix": self.path, "Delimiter": "/"}
        if after is not None:
            ask["StartAfter"] = self.key(after)
        while len(found) < limit:
            listed = self._call("read", self.client.list_objects_v2, MaxKeys=min(1000, limit - len(found) + 16), **ask)
            for item in listed.get("Contents", []):
                name = item["Key"][len(self.path):]
                if name.endswith(SUFFIX) and self.valid_name(name[: -len(SUFFIX)]) and len(found) < limit:
                    found.append(Stored(name[: -len(SUFFIX)], item["ETag"], item["LastModified"].timestamp(),
                                        item["Size"]))
            if not listed.get("IsTruncated"):
                break
            ask["ContinuationToken"] = listed["NextContinuationToken"]
        return found

    def _call(self, done: str, call, **arguments):
        """`call(**arguments)`; None where the object does not exist; StoreUnavailable, in one
        sentence, for everything else that goes wrong."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from urllib3.exceptions import HTTPError

        try:
            return call(**arguments)
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                        "InvalidToken"):
                raise StoreUnavailable(f"{self.url}: access denied ({code}); check the credentials "
                                       "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws).") from None
            if code == "NoSuchBucket":
                raise StoreUnavailable(f"{self.url}: there is no bucket '{self.bucket}'.") from None
            raise StoreUnavailable(f"{self.url}: cannot be {done} ({code}: {error.get('Message', '')}).") from None
        except NoCredentialsError:
            raise StoreUnavailable(f"{self.url}: no credentials found; set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE.") from None
        except (BotoCoreError, HTTPError) as e:
            raise StoreUnavailable(f"{self.url}: cannot be reached ({e}).") from None


def open_store(location: str | os.PathLike, valid_name=None) -> PrefixStore:
    """The store at `location`: s3://BUCKET/PATH, or a local folder."""
    if str(location).startswith("s3://"):
        return S3Store(str(location), valid_name)
    return FolderStore(location, valid_name)
