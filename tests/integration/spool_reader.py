#!/usr/bin/env python3
"""An independent reader of the posthaste spool (standard library only).

Written from the format description, not from the C code, so that the tests
check the daemon's files against a second implementation. Little-endian:

  SPOOL/w<N>/seg-<16 hex>.log
    segment header, 32 octets: "PHSPOOL1", u32 version (1 or 2), u32 worker,
                               u64 seq, u64 ctime
    records, each at an offset that is a multiple of 8:
      header, 24 octets: u32 magic 0x52485350, u32 crc32c, u32 length,
                         u8 type, u8 flags, u16 tag, u64 queue_id
      `length` payload octets, then zero padding to a multiple of 8
    version 1: crc32c (Castagnoli) covers the 16 header octets after the crc
    field and the payload; the tag ("reserved") is ignored.
    version 2 (records bound to the segment's seq, so that a recycled file's
    older contents never read as records): tag = seq & 0xffff and must match;
    crc = crc32c over the same octets with the tag taken as 0, xor
    (seq & 0xffffffff) ^ (seq >> 32) ^ 0x32565350.
  SPOOL/w<N>/spare-<K>.log: dead segment files kept for reuse; never read.

  type 1 (message): payload = envelope + body
    envelope: u32 env_len (octets of the envelope, this field included),
              u64 received (unix ms), u16 flags, u64 body length,
              u16 len + sender, u16 len + helo, u16 len + peer, u16 len + envid,
              u32 nrcpts, per recipient: u16 len + address, u8 notify,
              u16 len + orcpt
    body: the rest of the payload (body length octets)

A damaged record (bad magic, checksum, length past the end of the file, bad
envelope) is reported in Scan.bad and skipped: the reader looks for the next
valid record header at the following 8-octet boundaries, so a torn tail or a
damaged record in the middle never hides the good records after it. In a
version-2 segment, a position that is not a record of the segment (wrong
magic or tag: zeros, an older incarnation's records or their remains) is the
end when no valid record of the segment follows and the header would not
verify with the magic and tag taken as right; otherwise it is damage.

Usage as a module: scan(DIR) -> Scan (see below). As a script:
  spool_reader.py [--ids] [--bodies] DIR
prints a summary (or every queue id, one a line).
"""
import os
import struct
import sys

SEGMENT_MAGIC = b"PHSPOOL1"
SEGMENT_VERSIONS = (1, 2)
SALT_KEY = 0x32565350
SEGMENT_HEADER = struct.Struct("<8sIIQQ")  # 32 octets
RECORD_MAGIC = 0x52485350
RECORD_HEADER = struct.Struct("<IIIBBHQ")  # 24 octets
RECORD_MESSAGE = 1
RECORD_MAX_PAYLOAD = 1 << 30  # a header claiming more is damaged
ALIGN = 8

ENV_SMTPUTF8 = 0x01
ENV_8BITMIME = 0x02
ENV_RET_FULL = 0x04
ENV_RET_HDRS = 0x08
ENV_CHUNKED = 0x10
ENV_ESMTP = 0x20

assert SEGMENT_HEADER.size == 32 and RECORD_HEADER.size == 24

# --------------------------------------------------------------------------- CRC32C

_POLY = 0x82F63B78  # Castagnoli, reflected


def _tables():
    t0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t0.append(c)
    tabs = [t0]
    for _ in range(7):
        prev = tabs[-1]
        tabs.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
    return tabs


_T = _tables()
_Q = struct.Struct("<Q")


def crc32c(data, crc=0):
    """CRC-32C of data (bytes-like), continuing from crc (a previous result).
    Table-driven, eight octets per step (slicing-by-8)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc ^= 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n = len(mv)
    n8 = n - n % 8
    if n8:
        for (q,) in _Q.iter_unpack(mv[:n8]):
            q ^= crc
            crc = (t7[q & 0xFF] ^ t6[(q >> 8) & 0xFF] ^ t5[(q >> 16) & 0xFF] ^
                   t4[(q >> 24) & 0xFF] ^ t3[(q >> 32) & 0xFF] ^ t2[(q >> 40) & 0xFF] ^
                   t1[(q >> 48) & 0xFF] ^ t0[q >> 56])
    for b in mv[n8:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_bitwise(data):
    crc = 0xFFFFFFFF
    for b in bytes(data):
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# the standard check value, and the table code against the bit-at-a-time definition
assert crc32c(b"123456789") == 0xE3069283
assert crc32c(bytes(range(256)) * 3 + b"xyz") == _crc32c_bitwise(bytes(range(256)) * 3 + b"xyz")
assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283

# --------------------------------------------------------------------------- results


def format_id(qid):
    """A queue id as the daemon prints it: 16 upper-case hex digits."""
    return "%016X" % qid


class Message:
    """One valid message record."""

    __slots__ = ("id", "qid", "segment", "offset", "record_flags", "received_ms", "flags",
                 "body_len", "sender", "helo", "peer", "envid", "rcpts", "body")

    def __repr__(self):
        return "<Message %s from %r to %r, %d octets (%s @%d)>" % (
            self.id, self.sender, [r[0] for r in self.rcpts], self.body_len,
            os.path.basename(self.segment), self.offset)

    @property
    def recipients(self):
        """The recipient addresses (bytes), in order."""
        return [r[0] for r in self.rcpts]


class Segment:
    __slots__ = ("path", "worker", "seq", "ctime", "version", "size", "records", "error")

    def __repr__(self):
        return "<Segment %s worker %s seq %s, %d octets, %d records%s>" % (
            self.path, self.worker, self.seq, self.size, self.records,
            ", " + self.error if self.error else "")


class Scan:
    """The result of scan():
    messages    {id (16 upper-case hex): Message}, the first record of each id
    records     every valid message record, in segment order (duplicates included)
    duplicates  ids found in more than one valid message record
    other       [(segment, offset, type, id)] valid records of other types
    bad         [(segment, offset, reason)] damaged records and torn tails skipped
    bad_envelopes [(segment, offset, id, reason)] message records whose checksum
                verifies but whose envelope does not parse (a writer bug)
    segments    [Segment] (also the ones whose header is bad)
    """

    def __init__(self):
        self.messages = {}
        self.records = []
        self.duplicates = []
        self.other = []
        self.bad = []
        self.bad_envelopes = []
        self.segments = []

    @property
    def ids(self):
        return set(self.messages)

    def __len__(self):
        return len(self.records)

    def summary(self):
        return ("%d message records (%d distinct ids, %d duplicated), %d other records, "
                "%d damaged, %d bad envelopes, %d segments"
                % (len(self.records), len(self.messages), len(self.duplicates), len(self.other),
                   len(self.bad), len(self.bad_envelopes), len(self.segments)))


# --------------------------------------------------------------------------- parsing


class _Bad(Exception):
    pass


def _envelope(payload, keep_body):
    """Parses a message payload into (fields dict). Raises _Bad."""
    n = len(payload)
    pos = 0

    def take(fmt_size, fmt):
        nonlocal pos
        if pos + fmt_size > n:
            raise _Bad("envelope truncated")
        v = struct.unpack_from(fmt, payload, pos)[0]
        pos += fmt_size
        return v

    def string():
        nonlocal pos
        ln = take(2, "<H")
        if pos + ln > n:
            raise _Bad("envelope string past the envelope's end")
        s = bytes(payload[pos:pos + ln])
        pos += ln
        return s

    env_len = take(4, "<I")
    if env_len > n or env_len < 4 + 8 + 2 + 8 + 4 * 2 + 4:
        raise _Bad("bad envelope length %d (payload %d)" % (env_len, n))
    n = env_len  # nothing of the envelope may lie past env_len
    f = {}
    f["received_ms"] = take(8, "<Q")
    f["flags"] = take(2, "<H")
    f["body_len"] = take(8, "<Q")
    f["sender"] = string()
    f["helo"] = string()
    f["peer"] = string()
    f["envid"] = string()
    nrcpts = take(4, "<I")
    if nrcpts > (env_len - pos) // 5 + 1:
        raise _Bad("recipient count %d cannot fit" % nrcpts)
    rcpts = []
    for _ in range(nrcpts):
        addr = string()
        notify = take(1, "<B")
        orcpt = string()
        rcpts.append((addr, notify, orcpt))
    f["rcpts"] = rcpts
    if pos != env_len:
        raise _Bad("envelope length %d but its fields end at %d" % (env_len, pos))
    body_avail = len(payload) - env_len
    if body_avail != f["body_len"]:
        raise _Bad("body length %d in the envelope, %d octets in the record"
                   % (f["body_len"], body_avail))
    f["body"] = bytes(payload[env_len:]) if keep_body else None
    return f


def _crc(buf, off, end, bind):
    """The crc the record at off (payload up to end) should carry; bind: (salt, tag) or None."""
    if bind is None:
        c = crc32c(buf[off + 8:off + RECORD_HEADER.size])
    else:
        c = crc32c(buf[off + 8:off + 14])
        c = crc32c(b"\0\0", c)
        c = crc32c(buf[off + 16:off + RECORD_HEADER.size], c)
    c = crc32c(buf[off + RECORD_HEADER.size:end], c)
    return c if bind is None else c ^ bind[0]


class _NotOurs(_Bad):
    pass


def _try_record(buf, off, size, bind=None):
    """Validates the record at off. Returns (type, flags, qid, payload_end) or raises _Bad
    (_NotOurs for a version-2 header whose magic or tag is not the segment's)."""
    if off + RECORD_HEADER.size > size:
        raise _Bad("torn record header (%d octets left)" % (size - off))
    magic, crc, length, rtype, rflags, tag, qid = RECORD_HEADER.unpack_from(buf, off)
    if magic != RECORD_MAGIC:
        raise _NotOurs("bad record magic 0x%08x" % magic)
    if bind is not None and tag != bind[1]:
        raise _NotOurs("record tag 0x%04x, not the segment's 0x%04x" % (tag, bind[1]))
    if length > RECORD_MAX_PAYLOAD:
        raise _Bad("impossible record length %d" % length)
    end = off + RECORD_HEADER.size + length
    if end > size:
        raise _Bad("torn record: length %d past the end of the file" % length)
    c = _crc(buf, off, end, bind)
    if c != crc:
        raise _Bad("bad checksum (stored 0x%08x, computed 0x%08x)" % (crc, c))
    return rtype, rflags, qid, end


def _ours_but_magic_or_tag(buf, off, size, bind):
    """Whether the header at off would verify with its magic and tag taken as right."""
    if off + RECORD_HEADER.size > size:
        return False
    _m, crc, length, _t, _f, _tag, _q = RECORD_HEADER.unpack_from(buf, off)
    end = off + RECORD_HEADER.size + length
    return length <= RECORD_MAX_PAYLOAD and end <= size and _crc(buf, off, end, bind) == crc


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _scan_segment(path, keep_bodies, ids_only=False):
    """(Segment, [Message], other, bad, bad_envelopes) for one segment file; with
    ids_only, [queue id (int)] instead of the Message list (envelopes still checked)."""
    seg = Segment()
    seg.path = path
    seg.worker = seg.seq = seg.ctime = seg.version = None
    seg.records = 0
    seg.error = None
    msgs, other, bad, bad_env = [], [], [], []
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)
    seg.size = size
    if size < SEGMENT_HEADER.size:
        seg.error = "short segment header (%d octets)" % size
        return seg, msgs, other, bad, bad_env
    magic, version, worker, seq, ctime = SEGMENT_HEADER.unpack_from(data, 0)
    seg.version, seg.worker, seg.seq, seg.ctime = version, worker, seq, ctime
    if magic != SEGMENT_MAGIC or version not in SEGMENT_VERSIONS:
        seg.error = "bad segment header (magic %r, version %d)" % (magic, version)
        return seg, msgs, other, bad, bad_env
    bind = None
    if version >= 2:
        bind = ((seq & 0xFFFFFFFF) ^ (seq >> 32) ^ SALT_KEY, seq & 0xFFFF)
        name = os.path.basename(path)
        if name.startswith("seg-") and name.endswith(".log"):
            try:
                if int(name[4:-4], 16) != seq:
                    seg.error = "header sequence %x is not the name's" % seq
                    return seg, msgs, other, bad, bad_env
            except ValueError:
                pass
    buf = memoryview(data)
    magic_bytes = struct.pack("<I", RECORD_MAGIC)
    off = SEGMENT_HEADER.size
    for _ in range(size):  # bounded: every step moves off forward by at least 8
        if off >= size:
            break
        try:
            rtype, rflags, qid, end = _try_record(buf, off, size, bind)
        except _Bad as e:
            if not any(data[off:]):
                break  # nothing but zeros: blocks allocated, never written; a clean end
            # resynchronise: the next 8-aligned offset holding a valid record
            nxt = off + ALIGN
            found = None
            for _ in range(size):
                i = data.find(magic_bytes, nxt)
                if i < 0:
                    break
                if i % ALIGN:
                    nxt = i + (ALIGN - i % ALIGN)
                    continue
                try:
                    _try_record(buf, i, size, bind)
                except _Bad:
                    nxt = i + ALIGN
                    continue
                found = i
                break
            if bind is not None and found is None:
                # version 2: not ours, nothing of ours after it: the end, unless the
                # header is ours with a damaged magic or tag
                if isinstance(e, _NotOurs) and not _ours_but_magic_or_tag(buf, off, size, bind):
                    break
                if off + RECORD_HEADER.size > size and not isinstance(e, _NotOurs):
                    cut = data[off:]
                    if (magic_bytes[:len(cut)] != cut[:4] or
                            (len(cut) >= 16 and struct.unpack_from("<H", cut, 14)[0] != bind[1])):
                        break  # a cut header that is not ours
            bad.append((path, off, str(e)))
            if found is None:
                break
            off = found
            continue
        seg.records += 1
        fields = None
        if rtype == RECORD_MESSAGE:
            try:
                fields = _envelope(buf[off + RECORD_HEADER.size:end], keep_bodies)
            except _Bad as e:
                bad_env.append((path, off, format_id(qid), str(e)))
        if fields is not None and ids_only:
            msgs.append(qid)
        elif fields is not None:
            m = Message()
            m.qid = qid
            m.id = format_id(qid)
            m.segment = path
            m.offset = off
            m.record_flags = rflags
            for k, v in fields.items():
                setattr(m, k, v)
            msgs.append(m)
        elif rtype != RECORD_MESSAGE:
            other.append((path, off, rtype, format_id(qid)))
        off = _align(end)
    return seg, msgs, other, bad, bad_env


# Segments are append-only and never written again once their daemon is gone
# (a recycled file comes back under a new name): their parse is cached by
# (path, device, inode, size, mtime) so that repeated scans of a growing spool
# (the crash loop) only read the new files.
_cache = {}


def _segment_files(spool_dir):
    out = []
    for wd in sorted(os.listdir(spool_dir)):
        p = os.path.join(spool_dir, wd)
        if not (wd.startswith("w") and wd[1:].isdigit() and os.path.isdir(p)):
            continue
        for name in sorted(os.listdir(p)):
            if name.startswith("seg-") and name.endswith(".log"):
                out.append(os.path.join(p, name))
    return out


def scan(spool_dir, bodies=True, cache=True):
    """Reads every segment under spool_dir. bodies=False keeps only body lengths."""
    res = Scan()
    for path in _segment_files(spool_dir):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, bool(bodies))
        got = _cache.get(key) if cache else None
        if got is None:
            try:
                got = _scan_segment(path, bodies)
            except FileNotFoundError:
                continue
            if cache:
                for k in [k for k in _cache if k[0] == path]:
                    del _cache[k]
                _cache[key] = got
        seg, msgs, other, bad, bad_env = got
        res.segments.append(seg)
        res.other.extend(other)
        res.bad.extend(bad)
        res.bad_envelopes.extend(bad_env)
        for m in msgs:
            res.records.append(m)
            if m.id in res.messages:
                res.duplicates.append(m.id)
            else:
                res.messages[m.id] = m
    return res


class SpoolIndex:
    """An incremental, ids-only view of a spool for long runs (the crash loop):
    refresh() reads only the segments that are new or changed since the last call
    (by device, inode, size and mtime) and forgets the ones that are gone.

    counts      {queue id (int): number of valid message records with that id}
    records     valid message records in all
    """

    def __init__(self, spool_dir):
        self.dir = spool_dir
        self.counts = {}
        self.records = 0
        self._segs = {}  # path -> (key, Segment, [qid], other, bad, bad_envelopes)

    def _add(self, entry, sign):
        counts = self.counts
        for q in entry[2]:
            n = counts.get(q, 0) + sign
            if n:
                counts[q] = n
            else:
                del counts[q]
        self.records += sign * len(entry[2])

    def refresh(self):
        seen = set()
        for path in _segment_files(self.dir):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            old = self._segs.get(path)
            if old is not None and old[0] == key:
                seen.add(path)
                continue
            try:
                got = _scan_segment(path, False, ids_only=True)
            except FileNotFoundError:
                continue
            seen.add(path)
            if old is not None:
                self._add(old, -1)
            entry = (key,) + got
            self._segs[path] = entry
            self._add(entry, 1)
        for path in [p for p in self._segs if p not in seen]:
            self._add(self._segs.pop(path), -1)
        return self

    def __contains__(self, qid):
        return qid in self.counts

    def _all(self, i):
        out = []
        for e in self._segs.values():
            out.extend(e[i])
        return out

    @property
    def segments(self):
        return [e[1] for e in self._segs.values()]

    @property
    def other(self):
        return self._all(3)

    @property
    def bad(self):
        return self._all(4)

    @property
    def bad_envelopes(self):
        return self._all(5)

    @property
    def duplicates(self):
        return [format_id(q) for q, n in self.counts.items() if n > 1]

    def summary(self):
        return ("%d message records (%d distinct ids), %d other records, %d damaged, "
                "%d bad envelopes, %d segments" % (self.records, len(self.counts),
                                                   len(self.other), len(self.bad),
                                                   len(self.bad_envelopes), len(self._segs)))


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="Reads a posthaste spool independently of the daemon.")
    ap.add_argument("spool")
    ap.add_argument("--ids", action="store_true", help="print every message id, one a line")
    ap.add_argument("--verbose", "-v", action="store_true", help="list segments, damage, messages")
    a = ap.parse_args(argv)
    s = scan(a.spool, bodies=False, cache=False)
    if a.ids:
        for m in s.records:
            print(m.id)
        return 0
    if a.verbose:
        for seg in s.segments:
            print(seg)
        for b in s.bad:
            print("damaged: %s at %d: %s" % b)
        for b in s.bad_envelopes:
            print("bad envelope: %s at %d, id %s: %s" % b)
        for m in s.records:
            print(m)
    print(s.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
