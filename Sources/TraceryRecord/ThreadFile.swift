import CTraceryShims
#if canImport(Glibc)
  import Glibc
#endif

/// A part of a trace directory that could not be read as it was written: a damaged span of a
/// thread's events, or a file that is missing, empty or unreadable. Readers keep everything
/// intact around it and say what was lost (`Trace.damage`, `EventCursor.damage`).
public struct Damage: Sendable, Equatable {
  /// The file's path.
  public let file: String
  /// The first damaged byte (0 for a whole file).
  public let offset: Int
  /// Bytes skipped (the whole file's size for a file that could not be read at all).
  public let bytes: Int
  /// What was wrong.
  public let reason: String

  /// About how many events the skipped bytes held (a call is 24 bytes: 16 entry, 8 exit).
  public var eventsSkipped: Int { (bytes + 11) / 12 }
}

/// One thread's event file as the directory names it and its header says.
public struct ThreadFile: Sendable {
  public let path: String
  public let session: String
  public let pid: Int32
  public let tid: Int32
  /// The thread's name when it started recording (empty when unknown).
  public let name: String
  /// Events the recorder could not store (no buffer space): the trace is incomplete there.
  public let dropped: UInt64
  public let chunkSize: Int
  public let size: Int
  /// Format 3 and later: every chunk begins with its seal (`ChunkSeal`).
  public let sealed: Bool
  /// Where the thread's events end, as its process file says (`thread-end`): nil when it does
  /// not say (the thread was running when writing stopped, or an older trace). Bytes past it
  /// were not written by the recorder.
  public var writtenEnd: Int?
  /// Calls left untraced because their caller was in no known code (a JIT's code), as the
  /// thread counted them up to the end of its file (0 when it ended without writing it).
  public var foreignCalls: UInt64 = 0

  /// Reads the name and header of `path`; nil and why when the file cannot be read as events.
  public static func open(path: String, name fileName: String) -> (file: ThreadFile?, damage: Damage?) {
    // SESSION-TID.events, SESSION = PID.GENERATION; or SESSION-spareN.events, a file made
    // before the program dropped its privileges, whose thread id is in its header (0: never
    // taken, skipped).
    let stem = fileName.dropLast(".events".count)
    let dash = stem.lastIndex(of: "-")
    let spare = dash.map { stem[stem.index(after: $0)...].hasPrefix("spare") } ?? false
    guard let dash, var tid = spare ? 0 : Int32(stem[stem.index(after: dash)...]),
      let pid = Int32(stem[..<dash].split(separator: ".").first ?? "")
    else {
      return (nil, Damage(file: path, offset: 0, bytes: 0, reason: "not a thread file name (SESSION-TID.events)"))
    }
    let session = String(stem[..<dash])
    let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return (nil, Damage(file: path, offset: 0, bytes: 0, reason: "cannot be read")) }
    defer { close(fd) }
    var status = stat()
    let size = fstat(fd, &status) == 0 ? Int(status.st_size) : 0
    func whole(_ reason: String) -> (file: ThreadFile?, damage: Damage?) {
      (nil, Damage(file: path, offset: 0, bytes: size, reason: reason))
    }
    if size == 0 { return whole("empty (0 bytes): the thread wrote nothing or the file was cut") }
    guard size >= TraceFormat.headerSize else {
      return whole("truncated (\(size) bytes; the header alone is \(TraceFormat.headerSize))")
    }
    var header = [UInt8](repeating: 0, count: 96)
    guard header.withUnsafeMutableBytes({ pread(fd, $0.baseAddress, 96, 0) }) == 96 else {
      return whole("cannot be read")
    }
    guard Array(header[0..<8]) == TraceFormat.magic else { return whole("not a Tracery event file (bad magic)") }
    let version = UInt32(header.load(TraceFormat.Header.version, count: 4))
    guard version >= TraceFormat.oldestReadable && version <= TraceFormat.version else {
      return whole(
        "format version \(version); this tracery reads versions \(TraceFormat.oldestReadable) to \(TraceFormat.version)"
      )
    }
    let rawChunkSize = header.load(TraceFormat.Header.chunkSize)
    let chunkSize = Int(clamping: rawChunkSize)
    guard chunkSize >= 16, chunkSize % 8 == 0, chunkSize <= 1 << 40 else {
      return whole("bad chunk size \(rawChunkSize) in the header")
    }
    if spare {
      tid = Int32(bitPattern: UInt32(header.load(TraceFormat.Header.tid, count: 4)))
      // Never taken: no thread wrote it.
      guard tid != 0 else { return (nil, nil) }
    }
    let name = header[(TraceFormat.Header.name)..<(TraceFormat.Header.name + 16)].prefix { $0 != 0 }
    var file = ThreadFile(
      path: path, session: session, pid: pid, tid: tid, name: String(decoding: name, as: UTF8.self),
      dropped: header.load(TraceFormat.Header.dropped), chunkSize: chunkSize, size: size, sealed: version >= 3)
    file.foreignCalls = header.load(TraceFormat.Header.foreignCalls)
    return (file, nil)
  }
}

extension [ThreadFile] {
  /// The sum of a header count over the files, saturating at `UInt64.max`: the counts are what
  /// the files' headers say, and a damaged header may say anything (an overflowing sum trapped).
  public func total(_ count: (ThreadFile) -> UInt64) -> UInt64 {
    reduce(0) { sum, file in
      let (total, overflow) = sum.addingReportingOverflow(count(file))
      return overflow ? .max : total
    }
  }
}

/// Reads a file through one window of at most `capacity` bytes (`pread`), moved as reads ask:
/// memory stays bounded whatever the file's size. `release()` gives the descriptor and the
/// window back; the next read takes them again.
///
/// Memory: `window` is an allocation of `capacity` bytes owned by this object (freed in
/// `release` and `deinit`); `[start, start + filled)` of the file is in it. Only the reader that
/// owns the cursor uses it (one thread).
final class ByteWindow {
  let path: String
  let size: Int
  private let capacity: Int
  @exclusivity(unchecked) private var fd: Int32 = -1
  @exclusivity(unchecked) private var window: UnsafeMutableRawPointer?
  @exclusivity(unchecked) private var start = 0
  @exclusivity(unchecked) private var filled = 0

  init(path: String, size: Int, capacity: Int = 64 << 10) {
    self.path = path
    self.size = size
    self.capacity = max(capacity, 4096)
  }

  deinit { release() }

  var isOpen: Bool { fd >= 0 }

  func release() {
    if fd >= 0 { close(fd) }
    fd = -1
    window?.deallocate()
    window = nil
    filled = 0
  }

  /// Makes [offset, offset + count) readable from the window (count ≤ capacity); false past the
  /// file's end or when the file cannot be read.
  @inline(__always)
  private func cover(_ offset: Int, _ count: Int) -> Bool {
    if offset >= start, offset + count <= start + filled { return true }
    return refill(offset, count)
  }

  /// Whether the file is open (opened now if it was not).
  private func opened() -> Bool {
    if fd < 0 { fd = open(path, O_RDONLY | O_CLOEXEC) }
    return fd >= 0
  }

  private func refill(_ offset: Int, _ count: Int) -> Bool {
    guard offset >= 0, count <= capacity, offset + count <= size, opened() else { return false }
    if window == nil { window = .allocate(byteCount: capacity, alignment: 8) }
    let length = min(capacity, size - offset)
    let got = pread(fd, window, length, off_t(offset))
    guard got >= count else {
      filled = 0
      return false
    }
    start = offset
    filled = got
    return true
  }

  /// The little-endian word at `offset` (0 when it cannot be read).
  @inline(__always)
  func word(_ offset: Int) -> UInt64 {
    guard cover(offset, 8) else { return 0 }
    return UInt64(littleEndian: window!.loadUnaligned(fromByteOffset: offset - start, as: UInt64.self))
  }

  func byte(_ offset: Int) -> UInt8? {
    guard cover(offset, 1) else { return nil }
    return window!.load(fromByteOffset: offset - start, as: UInt8.self)
  }

  /// The checksum (`ChunkSeal.Checksum`) of `count` bytes at `offset`; nil when they cannot be
  /// read.
  func checksum(_ offset: Int, count: Int) -> UInt64? {
    var checksum = ChunkSeal.Checksum()
    var at = offset
    while at < offset + count {
      let step = min(capacity, offset + count - at)
      guard cover(at, step) else { return nil }
      checksum.add(window! + (at - start), count: step)
      at += step
    }
    return checksum.value
  }

  /// The end of the file's last stretch of data, as its file system tells (SEEK_DATA/SEEK_HOLE):
  /// what follows is a hole, or space reserved and never written, that reads as zeros. A thread
  /// file grows by whole chunks and a short process writes a few KiB of its first: read
  /// backwards, its 1 MiB of zeros cost `tracery record` ~0.8 ms a file at its end (the kernel
  /// fills a page with zeros for each page of a hole read). `size` when the file system cannot say.
  private func lastDataEnd(from offset: Int) -> Int {
    guard opened() else { return size }
    var end = offset
    var at = offset
    while at < size {
      let data = lseek(fd, off_t(at), ctracery_SEEK_DATA)
      // ENXIO: no data after `at`; anything else: not known.
      guard data >= 0 else { return errno == ENXIO ? end : size }
      let hole = lseek(fd, data, ctracery_SEEK_HOLE)
      guard hole > data else { return size }
      end = Int(hole)
      at = Int(hole)
    }
    return min(end, size)
  }

  /// The offset of the first non-zero word in [from, to), if any.
  func firstNonZero(from: Int, to: Int) -> Int? {
    var at = from
    while at + 8 <= to {
      if word(at) != 0 { return at }
      at += 8
    }
    return nil
  }

  /// The offset just past the last non-zero word (the header's size when there is none): what
  /// follows is space the recorder never wrote. Reads backwards from the end of the file's last
  /// data (`lastDataEnd`).
  func dataEnd(from headerSize: Int) -> Int {
    var end = min(size, lastDataEnd(from: headerSize)) / 8 * 8
    while end > headerSize {
      let step = min(capacity, end - headerSize) / 8 * 8
      guard step > 0, cover(end - step, step) else { return end }
      var at = end - 8
      while at >= end - step {
        if window!.loadUnaligned(fromByteOffset: at - start, as: UInt64.self) != 0 { return at + 8 }
        at -= 8
      }
      end -= step
    }
    return headerSize
  }
}

/// One thread's events in order, read from its file as they are asked for, skipping what is
/// damaged (memory: one window and the open calls' sites, whatever the file's size).
///
/// What the recorder writes is checked as it is read, so that damage (a scribbled, zeroed or
/// cut span) is skipped rather than taken for events, and reading goes on after it:
///
///     zero words, then data in the same chunk      damage (the recorder leaves zeros only
///                                                  at a chunk's end, or after its last event)
///     an unknown kind, a malformed data event      damage
///     an entry at site 0 or above user space       damage
///     an entry whose counter runs backwards, or    damage
///       more than 2^52 ticks (weeks) ahead
///     an entry deeper than the open ones + 1, an   damage, unless events were dropped (a
///       exit with no open entry at its depth         full disk leaves gaps), it is the
///                                                  file's first (a fork child's file
///                                                  begins inside its parent's calls), or
///                                                  it and the next two events are in
///                                                  order (a thread that switches stacks:
///                                                  `confirmedDespiteDepth`)
///
/// After damage, reading resumes at the first entry whose counter fits and whose next two
/// events fit it, counting as open the entries the damaged bytes could have held.
public struct EventCursor {
  public let file: ThreadFile
  private let source: ByteWindow
  private let gapsExpected: Bool
  private var offset = TraceFormat.headerSize
  private var lastData: Int?
  private var decoder = Event.Decoder()
  private var eventsBefore = false
  /// The event taken but not yet given (a data event after it adds its values).
  private var pending: Event?
  /// Where the damage being skipped began, and why.
  private var damaged: (offset: Int, reason: String)?
  /// The chunk being read: its first byte, and the end of its events (its sealed length, or the
  /// chunk's end when it has no seal).
  private var chunkStart = -1
  private var chunkLimit = 0
  /// Damage found so far.
  public private(set) var damage: [Damage] = []

  public init(_ file: ThreadFile, window: Int = 64 << 10) {
    self.file = file
    source = ByteWindow(path: file.path, size: file.size, capacity: window)
    gapsExpected = file.dropped > 0
  }

  /// Gives the descriptor and window back until the next read (a reader with many threads keeps
  /// only the busy ones open).
  public func release() { source.release() }

  public var isOpen: Bool { source.isOpen }

  /// The most zero bytes among events read as events abandoned (two entries' reservations).
  static let abandoned = 32

  /// The next event (its values attached), or nil at the end.
  public mutating func next() -> Event? {
    if lastData == nil { lastData = dataEnd() }
    let end = lastData!
    while offset < end {
      if offset >= chunkLimit {
        enterChunk(end: end)
        continue
      }
      if damaged == nil, decoder.last != 0, let (event, size) = fastEvent(at: offset, end: end) {
        decoder.accept(.event(event))
        offset += size
        let given = pending
        pending = event
        if let given { return given }
        continue
      }
      switch step(at: offset, decoder: decoder, resumingFrom: damaged?.offset, eventsBefore: eventsBefore, end: end) {
      case .zeros(let next) where damaged == nil && next - offset <= Self.abandoned:
        // An event's bytes reserved and never written: a signal handler `siglongjmp`ed out of
        // the code writing it (a handler interrupting handlers: a few). Not damage.
        offset = next
      case .zeros(let next):
        begin(at: offset, "zeroed bytes among the events")
        offset = next
      case .tail(let next):
        offset = next
      case .event(let decoded, let size)
      where damaged == nil && decoder.last != 0 || confirmed(decoded, after: offset + size, end: end):
        finish(at: offset)
        decoder.accept(decoded)
        offset += size
        switch decoded {
        case .values(let values):
          pending?.values = values
        case .event(let event):
          eventsBefore = true
          let given = pending
          pending = event
          if let given { return given }
        }
      case .unexpectedDepth(let decoded, let size)
      where damaged == nil && decoder.last != 0 && confirmedDespiteDepth(decoded, after: offset + size, end: end):
        // A thread that switched stacks (coroutines: swapcontext, a fiber library) has events
        // whose depths jump where the other stack's calls resume.
        decoder.accept(decoded)
        offset += size
        if case .event(let event) = decoded {
          eventsBefore = true
          let given = pending
          pending = event
          if let given { return given }
        }
      case .event, .unexpectedDepth, .notAnEvent:
        begin(at: offset, "not an event")
        offset += 8
      case .cut:
        begin(at: offset, "the file ends inside an event")
        offset += 8
      }
    }
    finish(at: min(offset, end))
    let given = pending
    pending = nil
    return given
  }

  /// Where the events end: the last non-zero word, or where the process file says they end.
  private mutating func dataEnd() -> Int {
    let found = source.dataEnd(from: TraceFormat.headerSize)
    guard let written = file.writtenEnd, written >= TraceFormat.headerSize else { return found }
    if written > file.size {
      damage.append(
        Damage(
          file: file.path, offset: file.size, bytes: written - file.size,
          reason: "the file is cut: its thread's events end at \(written), the file at \(file.size)"))
    } else if found > written, let junk = source.firstNonZero(from: written, to: found) {
      // Nothing lost (bytes: 0): these bytes never were events.
      damage.append(
        Damage(
          file: file.path, offset: junk, bytes: 0,
          reason:
            "\(found - junk) bytes after the thread's last event (at \(written)), not written by the recorder: ignored")
      )
    }
    return min(found, written)
  }

  /// At `offset`, the start of a chunk, or past the sealed events of the current one: reads
  /// the new chunk's seal and checks its events against it, or skips the rest of the current
  /// one (reporting anything but zeros there).
  private mutating func enterChunk(end: Int) {
    let start = offset - (offset - TraceFormat.headerSize) % file.chunkSize
    let chunkEnd = start + file.chunkSize
    if start == chunkStart {
      if let junk = source.firstNonZero(from: offset, to: min(chunkEnd, end)) {
        damage.append(
          Damage(
            file: file.path, offset: junk, bytes: 0,
            reason: "\(min(chunkEnd, end) - junk) bytes after the sealed events of the chunk at \(start), "
              + "not written by the recorder: ignored"))
      }
      offset = chunkEnd
      return
    }
    chunkStart = start
    chunkLimit = min(chunkEnd, file.size)
    guard file.sealed, offset == start else { return }
    let seal = source.word(start)
    let sum = source.word(start + 8)
    offset = start + ChunkSeal.size
    // Never sealed: the chunk was open when writing stopped. Its events are checked one by one.
    if seal == 0 && sum == 0 { return }
    let length = Int(seal & ChunkSeal.lengthMask)
    guard seal & ~ChunkSeal.lengthMask == ChunkSeal.marker, length % 8 == 0,
      length <= file.chunkSize - ChunkSeal.size
    else {
      damage.append(
        Damage(
          file: file.path, offset: start, bytes: 0,
          reason: "the seal of the chunk at \(start) is damaged: its events are checked one by one"))
      return
    }
    let eventsEnd = start + ChunkSeal.size + length
    guard eventsEnd <= file.size else {
      // Said once: the process file's `thread-end` already told (`dataEnd`).
      if let written = file.writtenEnd, written > file.size { return }
      damage.append(
        Damage(
          file: file.path, offset: file.size, bytes: eventsEnd - file.size,
          reason: "the file is cut inside the chunk at \(start), \(eventsEnd - file.size) bytes before its sealed end"))
      return
    }
    chunkLimit = eventsEnd
    if source.checksum(start + ChunkSeal.size, count: length) != sum {
      damage.append(
        Damage(
          file: file.path, offset: start, bytes: 0,
          reason:
            "checksum mismatch: the events of the chunk at \(start) changed after they were written (read as found)"))
    }
  }

  /// The common case, decoded without the general path's closures and copies: an entry or exit
  /// that passes the checks, wholly inside its chunk. nil: take the general path.
  @inline(__always)
  private func fastEvent(at offset: Int, end: Int) -> (Event, Int)? {
    let word = source.word(offset)
    let event = EventWord(raw: word)
    let open = decoder.openDepth
    switch event.kind {
    case EventWord.entryKind where offset + 16 <= chunkLimit:
      let depth = decoder.depth(of: event, entry: true)
      let timestamp = source.word(offset + 8)
      let site = event.low
      guard site != 0, site < 1 << 47, timestamp != 0, timestamp &+ Self.backwardsSlack >= decoder.last,
        timestamp < decoder.last &+ Self.forwardWindow, gapsExpected || depth <= open
      else { return nil }
      return (Event(timestamp: timestamp, site: site, depth: depth, kind: .entry), 16)
    case EventWord.exitKind:
      let depth = decoder.depth(of: event, entry: false)
      guard gapsExpected || depth < open else { return nil }
      guard case .event(let event)? = decoder.peek(word, load: { _ in nil }, byteAt: { _ in nil })?.decoded else {
        return nil
      }
      return (event, 8)
    default:
      return nil
    }
  }

  enum Step {
    /// An event that fits what came before it, and its size.
    case event(Event.Decoder.Decoded, size: Int)
    /// Zero words, then data in the same chunk (at `next`).
    case zeros(next: Int)
    /// Zeros to the chunk's end: the next event did not fit; data goes on at `next`.
    case tail(next: Int)
    case notAnEvent
    /// An event that goes past the end of the file.
    case cut
    /// An event that fits in every way but its depth (see `confirmedDespiteDepth`).
    case unexpectedDepth(Event.Decoder.Decoded, size: Int)
  }

  /// What is at `offset`, read with `decoder`'s knowledge. `resumingFrom`: where the damage
  /// being skipped began.
  private func step(at offset: Int, decoder: Event.Decoder, resumingFrom: Int?, eventsBefore: Bool, end: Int) -> Step {
    // The end of the events of the chunk at `offset`: the current chunk's limit, or (looking
    // ahead into the next chunk) that chunk's end; its seal is skipped.
    let start = offset - (offset - TraceFormat.headerSize) % file.chunkSize
    let chunkEnd: Int
    if start == chunkStart {
      guard offset < chunkLimit else { return .tail(next: start + file.chunkSize) }
      chunkEnd = chunkLimit
    } else {
      if file.sealed && offset == start { return .tail(next: start + ChunkSeal.size) }
      chunkEnd = min(start + file.chunkSize, file.size)
    }
    let source = self.source
    let word = source.word(offset)
    if word == 0 {
      var next = offset + 8
      while next + 8 <= chunkEnd, next < end, source.word(next) == 0 { next += 8 }
      return next + 8 <= chunkEnd && next < end ? .zeros(next: next) : .tail(next: chunkEnd)
    }
    guard
      let (decoded, size) = decoder.peek(
        word, load: { offset + $0 + 8 <= chunkEnd ? source.word(offset + $0) : nil },
        byteAt: { offset + $0 < chunkEnd ? source.byte(offset + $0) : nil })
    else { return offset + 16 > file.size ? .cut : .notAnEvent }
    let swallowed = resumingFrom.map { (offset - $0) / 16 }
    if Self.plausible(
      decoded, decoder: decoder, swallowed: swallowed, eventsBefore: eventsBefore, gapsExpected: gapsExpected)
    {
      return .event(decoded, size: size)
    }
    // (With gaps expected, no depth is checked.)
    let fitsButItsDepth = Self.plausible(
      decoded, decoder: decoder, swallowed: swallowed, eventsBefore: eventsBefore, gapsExpected: true)
    return fitsButItsDepth ? .unexpectedDepth(decoded, size: size) : .notAnEvent
  }

  /// An event whose depth does not follow the open calls (an entry deeper than them + 1, an exit
  /// with no open entry at its depth) is taken, mid-file, when its counter does not run
  /// backwards at all and the two events after it fit it in every way, depth included, their
  /// counters not running backwards either: what a thread that switches stacks writes (the
  /// recorder's depths count one shadow stack per thread, and a coroutine's calls resume on top
  /// of whatever the other stack did meanwhile). Scribbled bytes almost never pass: their counter
  /// would have to fall between two real events'.
  private func confirmedDespiteDepth(_ decoded: Event.Decoder.Decoded, after next: Int, end: Int) -> Bool {
    guard case .event(let event) = decoded, event.timestamp >= decoder.last else { return false }
    return nextTwoFit(after: decoded, at: next, end: end, inOrderFrom: event.timestamp)
  }

  /// An event with nothing to check its counter against (the first, or the first after damage)
  /// is taken when the events after it (two, or up to the end of the data) fit it.
  private func confirmed(_ decoded: Event.Decoder.Decoded, after next: Int, end: Int) -> Bool {
    guard case .event(let event) = decoded else { return false }
    // A file that begins with exits (a fork child returning from its parent's calls).
    if event.kind == .exit { return !eventsBefore && damaged == nil }
    return nextTwoFit(after: decoded, at: next, end: end, inOrderFrom: nil)
  }

  /// Whether the events at `next` (two, or up to the end of the data) fit, once `decoded` is
  /// taken; with `inOrderFrom`, their counters must not run back from it at all.
  private func nextTwoFit(after decoded: Event.Decoder.Decoded, at next: Int, end: Int, inOrderFrom: UInt64?) -> Bool {
    var decoder = self.decoder
    decoder.accept(decoded)
    var previous = inOrderFrom
    var offset = next
    var seen = 0
    while seen < 2, offset < end {
      switch step(at: offset, decoder: decoder, resumingFrom: nil, eventsBefore: true, end: end) {
      case .event(let decoded, let size):
        if let last = previous, case .event(let following) = decoded {
          guard following.timestamp >= last else { return false }
          previous = following.timestamp
        }
        decoder.accept(decoded)
        offset += size
        seen += 1
      case .tail(let next): offset = next
      case .cut: return true
      case .zeros, .notAnEvent, .unexpectedDepth: return false
      }
    }
    return true
  }

  private mutating func begin(at offset: Int, _ reason: String) {
    if damaged == nil { damaged = (offset, reason) }
  }

  private mutating func finish(at offset: Int) {
    guard let damaged else { return }
    damage.append(
      Damage(file: file.path, offset: damaged.offset, bytes: offset - damaged.offset, reason: damaged.reason))
    self.damaged = nil
  }

  private static let backwardsSlack: UInt64 = 1 << 32
  private static let forwardWindow: UInt64 = 1 << 52

  /// Whether an event fits what `decoder` knows (see the type's comment). While skipping damage
  /// (`swallowed`: the entries the damaged bytes could have held), only an entry is.
  private static func plausible(
    _ decoded: Event.Decoder.Decoded, decoder: Event.Decoder, swallowed: Int?, eventsBefore: Bool, gapsExpected: Bool
  ) -> Bool {
    let open = decoder.openDepth + (swallowed ?? 0)
    // A file's first events may close or nest in calls made before it began (a fork child's
    // inherited frames): no depth to check them against.
    let checkDepth = !gapsExpected && eventsBefore
    switch decoded {
    case .values:
      return swallowed == nil && eventsBefore
    case .event(let event) where event.kind == .entry:
      guard event.site != 0, event.site < 1 << 47, event.timestamp != 0 else { return false }
      if decoder.last != 0 {
        guard event.timestamp &+ backwardsSlack >= decoder.last, event.timestamp < decoder.last &+ forwardWindow
        else { return false }
      }
      return !checkDepth || event.depth <= open
    case .event(let event):
      guard swallowed == nil else { return false }
      return !checkDepth || event.depth < open
    }
  }
}

extension Trace {
  /// Reads one thread's event file whole (for tests and small tools; readers stream with
  /// `EventCursor`).
  /// `writtenEnd`: where its process file says the events end (`ThreadFile.writtenEnd`).
  static func readThread(path: String, name: String, writtenEnd: Int? = nil) -> (thread: Thread?, damage: [Damage]) {
    let (opened, damage) = ThreadFile.open(path: path, name: name)
    guard var file = opened else { return (nil, damage.map { [$0] } ?? []) }
    file.writtenEnd = writtenEnd
    var cursor = EventCursor(file)
    var events: [Event] = []
    while let event = cursor.next() { events.append(event) }
    var thread = Thread(session: file.session, pid: file.pid, tid: file.tid, events: events, dropped: file.dropped)
    thread.name = file.name
    return (thread, cursor.damage)
  }
}

extension ThreadFile {
  /// Cuts the event file at `path` down to what its thread wrote (files grow by whole chunks, 1
  /// MiB, reserved ahead): its data, and one word more, since an event can end in one zero word (a
  /// data event whose last value is 0). Only for a file no thread writes any more: the process is
  /// gone. Returns the bytes freed.
  @discardableResult
  public static func trim(path: String) -> Int {
    // Never through a symbolic link, and only a regular file: the directory may belong to the
    // traced program's user (`record -p` on another user's process), who could point a name at
    // any file the trimming user may write. The file opened is the one cut.
    let fd = Glibc.open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    var status = stat()
    guard fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG else { return 0 }
    let size = Int(status.st_size)
    guard size > TraceFormat.headerSize else { return 0 }
    let end = min(size, ByteWindow(path: path, size: size).dataEnd(from: TraceFormat.headerSize) + 8)
    guard end < size, ftruncate(fd, off_t(end)) == 0 else { return 0 }
    return size - end
  }
}
