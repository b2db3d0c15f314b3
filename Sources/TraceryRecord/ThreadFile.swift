/// A part of a trace directory that could not be read as it was written: a damaged span of a
/// thread's events, or a file that is missing, empty or unreadable. Readers keep everything
/// intact around it and say what was lost (`Trace.damage`).
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

extension Trace {
  /// Reads one thread's event file, skipping what is damaged.
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
  ///       exit with no open entry at its depth         full disk leaves gaps) or it is the
  ///                                                  file's first (a fork child's file
  ///                                                  begins inside its parent's calls)
  ///
  /// After damage, reading resumes at the first entry that passes these checks (an entry's
  /// counter is the only word with enough redundancy to find the way back), counting as open the
  /// entries the damaged bytes could have held.
  static func readThread(path: String, name: String) -> (thread: Thread?, damage: [Damage]) {
    // SESSION-TID.events, SESSION = PID.GENERATION
    let stem = name.dropLast(".events".count)
    guard let dash = stem.lastIndex(of: "-"), let tid = Int32(stem[stem.index(after: dash)...]),
      let pid = Int32(stem[..<dash].split(separator: ".").first ?? "")
    else {
      return (nil, [Damage(file: path, offset: 0, bytes: 0, reason: "not a thread file name (SESSION-TID.events)")])
    }
    let session = String(stem[..<dash])
    guard let bytes = Files.read(path) else {
      return (nil, [Damage(file: path, offset: 0, bytes: 0, reason: "cannot be read")])
    }
    func whole(_ reason: String) -> (thread: Thread?, damage: [Damage]) {
      (nil, [Damage(file: path, offset: 0, bytes: bytes.count, reason: reason)])
    }
    if bytes.isEmpty { return whole("empty (0 bytes): the thread wrote nothing or the file was cut") }
    guard bytes.count >= TraceFormat.headerSize else {
      return whole("truncated (\(bytes.count) bytes; the header alone is \(TraceFormat.headerSize))")
    }
    guard Array(bytes[0..<8]) == TraceFormat.magic else { return whole("not a Tracery event file (bad magic)") }
    let version = UInt32(bytes.load(TraceFormat.Header.version, count: 4))
    guard version == TraceFormat.version else {
      return whole("format version \(version); this tracery reads version \(TraceFormat.version)")
    }
    let dropped = bytes.load(TraceFormat.Header.dropped)
    let chunkSize = Int(bytes.load(TraceFormat.Header.chunkSize))
    guard chunkSize >= 16, chunkSize % 8 == 0, chunkSize <= 1 << 40 else {
      return whole("bad chunk size \(chunkSize) in the header")
    }
    var reader = ThreadFileReader(path: path, bytes: bytes, chunkSize: chunkSize, gapsExpected: dropped > 0)
    reader.read()
    var thread = Thread(session: session, pid: pid, tid: tid, events: reader.events, dropped: dropped)
    let name = bytes[(TraceFormat.Header.name)..<(TraceFormat.Header.name + 16)].prefix { $0 != 0 }
    thread.name = String(decoding: name, as: UTF8.self)
    return (thread, reader.damage)
  }
}

/// The checking decoder of `Trace.readThread` (its comment has the rules).
struct ThreadFileReader {
  let path: String
  let bytes: [UInt8]
  let chunkSize: Int
  /// Events were dropped: depths may jump.
  let gapsExpected: Bool
  var events: [Event] = []
  var damage: [Damage] = []

  private var decoder = Event.Decoder()
  /// Where the damage being skipped began, and why.
  private var damaged: (offset: Int, reason: String)?

  init(path: String, bytes: [UInt8], chunkSize: Int, gapsExpected: Bool) {
    self.path = path
    self.bytes = bytes
    self.chunkSize = chunkSize
    self.gapsExpected = gapsExpected
  }

  /// Depths beyond this wrap (events keep the depth modulo 2^14): not checked there.
  private static let checkedDepth = 0x3fff
  private static let backwardsSlack: UInt64 = 1 << 32
  private static let forwardWindow: UInt64 = 1 << 52

  mutating func read() {
    events.reserveCapacity((bytes.count - TraceFormat.headerSize) / 12)
    // The last non-zero word: zeros after it are unwritten space, not damage.
    var lastData = bytes.count - 8
    while lastData >= TraceFormat.headerSize, bytes.load(lastData) == 0 { lastData -= 8 }
    self.lastData = lastData
    var offset = TraceFormat.headerSize
    while offset <= lastData {
      switch step(at: offset, decoder: decoder, resumingFrom: damaged?.offset, eventsBefore: !events.isEmpty) {
      case .zeros(let next):
        begin(at: offset, "zeroed bytes among the events")
        offset = next
      case .tail(let next):
        offset = next
      case .event(let decoded, let size)
      where damaged == nil && decoder.last != 0 || confirmed(decoded, after: offset + size):
        end(at: offset)
        decoder.accept(decoded)
        switch decoded {
        case .event(let event): events.append(event)
        case .values(let values): events[events.count - 1].values = values
        }
        offset += size
      case .event, .notAnEvent:
        begin(at: offset, "not an event")
        offset += 8
      case .cut:
        begin(at: offset, "the file ends inside an event")
        offset += 8
      }
    }
    end(at: min(offset, lastData + 8))
  }

  private var lastData = 0

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
  }

  /// What is at `offset`, read with `decoder`'s knowledge. `resumingFrom`: where the damage
  /// being skipped began.
  private func step(at offset: Int, decoder: Event.Decoder, resumingFrom: Int?, eventsBefore: Bool) -> Step {
    let chunkStart = offset - (offset - TraceFormat.headerSize) % chunkSize
    let chunkEnd = min(chunkStart + chunkSize, bytes.count)
    let word = bytes.load(offset)
    if word == 0 {
      var next = offset + 8
      while next + 8 <= chunkEnd, bytes.load(next) == 0 { next += 8 }
      return next + 8 <= chunkEnd ? .zeros(next: next) : .tail(next: chunkEnd)
    }
    let bytes = self.bytes
    guard
      let (decoded, size) = decoder.peek(
        word, load: { offset + $0 + 8 <= chunkEnd ? bytes.load(offset + $0) : nil },
        byteAt: { offset + $0 < chunkEnd ? bytes[offset + $0] : nil })
    else { return offset + 16 > bytes.count ? .cut : .notAnEvent }
    let plausible = Self.plausible(
      decoded, decoder: decoder, swallowed: resumingFrom.map { (offset - $0) / 16 }, eventsBefore: eventsBefore,
      gapsExpected: gapsExpected)
    return plausible ? .event(decoded, size: size) : .notAnEvent
  }

  /// An event with nothing to check its counter against (the first, or the first after damage)
  /// is taken when the events after it (two, or up to the end of the data) fit it.
  private func confirmed(_ decoded: Event.Decoder.Decoded, after next: Int) -> Bool {
    guard case .event(let event) = decoded else { return false }
    // A file that begins with exits (a fork child returning from its parent's calls).
    if event.kind == .exit { return events.isEmpty && damaged == nil }
    var decoder = self.decoder
    decoder.accept(decoded)
    var offset = next
    var seen = 0
    while seen < 2, offset <= lastData {
      switch step(at: offset, decoder: decoder, resumingFrom: nil, eventsBefore: true) {
      case .event(let decoded, let size):
        decoder.accept(decoded)
        offset += size
        seen += 1
      case .tail(let next): offset = next
      case .cut: return true
      case .zeros, .notAnEvent: return false
      }
    }
    return true
  }

  private mutating func begin(at offset: Int, _ reason: String) {
    if damaged == nil { damaged = (offset, reason) }
  }

  private mutating func end(at offset: Int) {
    guard let damaged else { return }
    damage.append(Damage(file: path, offset: damaged.offset, bytes: offset - damaged.offset, reason: damaged.reason))
    self.damaged = nil
  }

  /// Whether an event fits what `decoder` knows (see `Trace.readThread`). While skipping damage
  /// (`swallowed`: the entries the damaged bytes could have held), only an entry is.
  private static func plausible(
    _ decoded: Event.Decoder.Decoded, decoder: Event.Decoder, swallowed: Int?, eventsBefore: Bool, gapsExpected: Bool
  ) -> Bool {
    let open = decoder.openDepth + (swallowed ?? 0)
    // A file's first events may close or nest in calls made before it began (a fork child's
    // inherited frames): no depth to check them against.
    let checkDepth = !gapsExpected && open < checkedDepth && eventsBefore
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
