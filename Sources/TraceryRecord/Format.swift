import CTracery

#if canImport(Glibc)
  import Glibc
#endif

/// The trace directory's formats (docs/trace-format.md describes them for other readers).
///
///     DIR/info                      the recording: command line, options (written by the CLI)
///     DIR/process-SESSION.info      one traced process image: pid, objects, clock (the agent)
///     DIR/SESSION-TID.events        one thread's events: a 4 KiB header, then entries (16 bytes)
///                                   and exits (8 bytes)
///
/// A SESSION is `PID.GENERATION`: GENERATION counts the `exec`s of that pid under the agent.
public enum TraceFormat {
  public static let magic: [UInt8] = Array("TRACERY1".utf8)
  /// 3: every chunk begins with its seal (`ChunkSeal`). Version 2 files (no seals) are read too.
  public static let version: UInt32 = 3
  public static let oldestReadable: UInt32 = 2
  /// Events start here in a thread file; the header page before them stays mapped while the
  /// thread records, so its `dropped` count is always current on disk.
  public static let headerSize = 4096

  /// Traces hold arguments, strings and return values: only their owner may read them, unless
  /// `tracery record --shared` asked otherwise (`AgentEnvironment.shared`).
  public static var shared: Bool { AgentEnvironment.sharedRequested }
  public static var fileMode: mode_t { shared ? 0o644 : 0o600 }
  public static var directoryMode: mode_t { shared ? 0o755 : 0o700 }

  /// Thread file header fields (little-endian).
  public enum Header {
    public static let magic = 0  // 8 bytes
    public static let version = 8  // u32
    public static let pid = 12  // u32
    public static let tid = 16  // u32
    public static let chunkSize = 24  // u64
    public static let dropped = 32  // u64: events that found no room
    /// u64: calls left untraced because their caller was in no known code (a JIT's; 0 in files
    /// of earlier versions, whose header page was zeros there)
    public static let foreignCalls = 40
    public static let name = 64  // 16 bytes: the thread's name when it started recording (NUL-padded)
  }
}

/// The first 16 bytes of every chunk of a thread file (format 3): what the recorder wrote in
/// it, sealed when its thread left it, so that readers can tell intact events from damaged ones.
///
///     word 0   0x5EA1 << 48 | bytes of events after the seal (0: never sealed)
///     word 1   checksum of those bytes (`checksum`)
///
/// Protocol: the chunk's thread writes events after the seal and never touches the seal; when it
/// moves to its next chunk, exits, or the process exits, the seal is written once, by the
/// thread itself or by the helper that unmaps the chunk (`EventFile`), never while events are
/// still being written into the chunk. A chunk still unsealed at the end was open when writing
/// stopped (a thread still running at exit, a killed process): readers check its events one by
/// one only.
public enum ChunkSeal {
  public static let size = 16
  public static let marker: UInt64 = 0x5EA1 << 48
  public static let lengthMask: UInt64 = 0xffff_ffff_ffff

  /// A running checksum over 8-byte words (Fletcher's, with 64-bit sums): catches any changed
  /// word, and words moved.
  public struct Checksum {
    private var sum: UInt64 = 0
    private var weighted: UInt64 = 0

    public init() {}

    /// Adds `count` bytes (a multiple of 8) at `start`.
    public mutating func add(_ start: UnsafeRawPointer, count: Int) {
      var sum = self.sum
      var weighted = self.weighted
      var at = 0
      while at + 8 <= count {
        sum &+= start.loadUnaligned(fromByteOffset: at, as: UInt64.self)
        weighted &+= sum
        at += 8
      }
      self.sum = sum
      self.weighted = weighted
    }

    public var value: UInt64 { sum ^ (weighted << 32 | weighted >> 32) }
  }

  /// Seals the chunk at `chunk`, whose events take `length` bytes after the seal. The checksum
  /// first, then the word that says it is there.
  public static func seal(_ chunk: UnsafeMutableRawPointer, length: Int) {
    var checksum = Checksum()
    checksum.add(chunk + size, count: length)
    chunk.storeBytes(of: checksum.value, toByteOffset: 8, as: UInt64.self)
    chunk.storeBytes(of: marker | UInt64(length), as: UInt64.self)
  }
}

/// The first word of every event (`tracery.h`'s `TRACERY_EVENT_*`: the recorder's generated code
/// writes it from the same constants): the kind in bits 62-63, the depth modulo 2^14 in bits
/// 48-61, the site (an entry), the counter's low 48 bits (an exit) or the payload's size (a data
/// event) below.
public struct EventWord: Sendable, Equatable {
  public let raw: UInt64

  public static let entryKind = UInt64(TRACERY_HANDLER_ENTRY.rawValue)
  public static let exitKind = UInt64(TRACERY_HANDLER_EXIT.rawValue)
  public static let dataKind = UInt64(TRACERY_EVENT_DATA)
  static let kindShift = UInt64(TRACERY_EVENT_KIND_SHIFT)
  static let depthShift = UInt64(TRACERY_EVENT_DEPTH_SHIFT)
  static let depthMask = UInt64(TRACERY_EVENT_DEPTH_MASK)
  public static let lowMask: UInt64 = 1 << depthShift - 1

  @inline(__always) public init(raw: UInt64) { self.raw = raw }

  /// `depth` is kept modulo 2^14; `low` to 48 bits.
  @inline(__always) public init(kind: UInt64, depth: Int, low: UInt64) {
    raw =
      kind << Self.kindShift | (UInt64(truncatingIfNeeded: depth) & Self.depthMask) << Self.depthShift
      | low & Self.lowMask
  }

  @inline(__always) public var kind: UInt64 { raw >> Self.kindShift }
  @inline(__always) public var depth: Int { Int(truncatingIfNeeded: (raw >> Self.depthShift) & Self.depthMask) }
  @inline(__always) public var low: UInt64 { raw & Self.lowMask }
}

/// One recorded event: a traced function's entry or exit on one thread.
///
/// Bytes (little-endian words; the first word's bits 62-63 are the kind, 0 = never written):
///
///     entry, 16 bytes: site (bits 0-47) | depth mod 2^14 (48-61) | 1 << 62;  time-stamp counter
///     exit,   8 bytes: counter mod 2^48 (0-47) | depth mod 2^14 (48-61) | 2 << 62
///
/// An exit's counter gets its upper bits from the event before it (`Event.Decoder`), and its
/// site from the open entry at its depth. A data event (kind 3, `DataEvent`) may follow an
/// entry or an exit: its values belong to that event.
public struct Event: Sendable, Equatable {
  public enum Kind: UInt8, Sendable { case entry = 1, exit = 2 }
  public let timestamp: UInt64
  public let site: UInt64
  public let depth: Int
  public let kind: Kind
  /// Recorded arguments (of an entry) or return value (of an exit), from `-A` / `-R`.
  public var values: [RecordedValue] {
    get { box?.values ?? [] }
    set { box = newValue.isEmpty ? nil : Values(newValue) }
  }
  /// Out of line, and nil when there are none (nearly always): an `Event` is then plain data,
  /// copied without reference counting (readers copy millions of them).
  private var box: Values?

  private final class Values: Sendable {
    let values: [RecordedValue]
    init(_ values: [RecordedValue]) { self.values = values }
  }

  public static func == (a: Event, b: Event) -> Bool {
    a.timestamp == b.timestamp && a.site == b.site && a.depth == b.depth && a.kind == b.kind && a.values == b.values
  }

  public init(timestamp: UInt64, site: UInt64, depth: Int, kind: Kind) {
    self.timestamp = timestamp
    self.site = site
    self.depth = depth
    self.kind = kind
  }

  /// Decodes one thread's events in order: `peek` reads an event without changing what the
  /// decoder knows, `accept` takes it (a reader that doubts an event skips it instead).
  public struct Decoder {
    /// The counter of the last event taken (0: none yet).
    public private(set) var last: UInt64 = 0
    /// The open entries whose events were taken, shallowest first: depth and site. The depths
    /// between two of them (an entry deeper than the open ones, after damage) are open with
    /// unknown sites and take no room: a damaged or crafted file that jumps to a great depth
    /// costs nothing (it took a placeholder word per depth between).
    private var open: [(depth: Int, site: UInt64)] = []

    public init() {}

    /// Entries open now (as the events taken say).
    public private(set) var openDepth = 0

    /// The site of the open entry at `depth`, 0 when unknown.
    private func site(atDepth depth: Int) -> UInt64 {
      // Nearly always the deepest; else a binary search (depths ascend).
      if let last = open.last, last.depth == depth { return last.site }
      var (low, high) = (0, open.count)
      while low < high {
        let middle = (low + high) / 2
        if open[middle].depth < depth { low = middle + 1 } else { high = middle }
      }
      return low < open.count && open[low].depth == depth ? open[low].site : 0
    }

    public enum Decoded {
      case event(Event)
      /// A data event: the values of the event before it (`DataEvent`).
      case values([RecordedValue])
    }

    /// The event whose first word is `word`, and its size in bytes. `load(n)` and `byteAt(n)`
    /// read at byte n from the event's start, nil past the data. nil: an unwritten (zero) word,
    /// an unknown kind, or an event cut short.
    public func peek(_ word: UInt64, load: (Int) -> UInt64?, byteAt: (Int) -> UInt8?) -> (
      decoded: Decoded, size: Int
    )? {
      let event = EventWord(raw: word)
      switch event.kind {
      case EventWord.entryKind:
        guard let timestamp = load(8) else { return nil }
        let depth = depth(of: event, entry: true)
        return (.event(Event(timestamp: timestamp, site: event.low, depth: depth, kind: .entry)), 16)
      case EventWord.exitKind:
        let depth = depth(of: event, entry: false)
        var timestamp = last & ~EventWord.lowMask | event.low
        if timestamp < last { timestamp &+= EventWord.lowMask + 1 }
        return (.event(Event(timestamp: timestamp, site: site(atDepth: depth), depth: depth, kind: .exit)), 8)
      case EventWord.dataKind:
        let payload = Int(word & 0xffff_ffff)
        guard payload % 8 == 0,
          let values = DataEvent.values({ load(8 + $0) }, byteAt: { byteAt(8 + $0) }, payload: payload)
        else { return nil }
        return (.values(values), 8 + payload)
      default:
        return nil
      }
    }

    /// The depth an entry or exit word stands for. Its field keeps the depth modulo 2^14, and
    /// calls nest deeper than that (a recursion 100,000 deep): the depth is the one, among
    /// those the field allows, nearest to the one the open entries lead to expect (an entry
    /// opens at `openDepth`, an exit closes `openDepth - 1`). Shallower than 8,192, the field.
    @inline(__always) public func depth(of event: EventWord, entry: Bool) -> Int {
      let field = event.depth
      let expected = openDepth - (entry ? 0 : 1)
      let span = Int(EventWord.depthMask) + 1
      guard expected >= span / 2 else { return field }
      let depth = expected & ~(span - 1) | field
      if depth - expected > span / 2 { return depth - span }
      if expected - depth > span / 2 { return depth + span }
      return depth
    }

    /// Takes an event `peek` returned. An entry deeper than the open ones (after damage) opens
    /// the depths between as unknown.
    public mutating func accept(_ decoded: Decoded) {
      guard case .event(let event) = decoded else { return }
      last = event.timestamp
      if openDepth > event.depth {
        while let deepest = open.last, deepest.depth >= event.depth { open.removeLast() }
        openDepth = event.depth
      }
      if event.kind == .entry {
        open.append((event.depth, event.site))
        openDepth = event.depth + 1
      }
    }

    /// `peek`, then `accept`.
    public mutating func decode(_ word: UInt64, load: (Int) -> UInt64?, byteAt: (Int) -> UInt8?) -> (
      decoded: Decoded, size: Int
    )? {
      guard let result = peek(word, load: load, byteAt: byteAt) else { return nil }
      accept(result.decoded)
      return result
    }
  }

  /// The bytes the recorder writes for this event (for tests and tools).
  public var bytes: [UInt8] {
    var words: [UInt64]
    switch kind {
    case .entry: words = [EventWord(kind: EventWord.entryKind, depth: depth, low: site).raw, timestamp]
    case .exit: words = [EventWord(kind: EventWord.exitKind, depth: depth, low: timestamp).raw]
    }
    return words.flatMap { word in (0..<8).map { UInt8(truncatingIfNeeded: word >> (8 * $0)) } }
  }
}

/// What the agent writes about one traced process image (`process-SESSION.info`): a text file
/// of `key value` lines, values percent-escaped where they may hold spaces.
public struct TracedProcess: Sendable, Equatable {
  public struct Object: Sendable, Equatable {
    public let path: String
    public let bias: UInt64
    public let buildID: String?
    /// Its saved names, `DIR/symbols/KEY.sym` (`SymbolFile`); nil for objects without patch sites
    /// (and in traces older than the symbol files).
    public var symbols: String?

    public init(path: String, bias: UInt64, buildID: String?, symbols: String? = nil) {
      self.path = path
      self.bias = bias
      self.buildID = buildID
      self.symbols = symbols
    }

    /// With the build-id's bytes, written as lowercase hex.
    public init(path: String, bias: UInt64, buildIDBytes: [UInt8]?) {
      self.init(path: path, bias: bias, buildID: buildIDBytes.map(Self.hex))
    }

    public static func hex(_ bytes: [UInt8]) -> String {
      bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    /// Its line in the process file: `object 0xBIAS BUILDID PATH [SYMBOLS]` (also appended by
    /// the agent for an object loaded later).
    public var line: String {
      "object 0x\(String(bias, radix: 16)) \(buildID ?? "-") \(TextField.escape(path))"
        + (symbols.map { " " + $0 } ?? "")
    }
  }

  public var session: String
  public var pid: Int32
  public var parent: Int32
  public var executable: String
  public var arguments: [String]
  /// Time-stamp counter ticks per nanosecond, and a pair of readings taken together.
  public var ticksPerNanosecond: Double
  public var startTicks: UInt64
  public var startRealtimeNanoseconds: UInt64
  public var objects: [Object]
  /// Functions whose sites were patched; of them, those whose first instructions were moved
  /// out of line (`record --relocate`) and those traced through an int3 (slower: a signal a
  /// call); and the functions chosen that could not be traced at all.
  public var tracedFunctions: Int
  public var relocatedFunctions = 0
  public var trappedFunctions = 0
  public var untracedFunctions = 0
  /// The threads that made an event file, in order (`thread TID` lines, appended by the agent
  /// when each file is made).
  public var threads: [Int32] = []
  /// Threads that could not make their event file (`thread-unrecorded TID`: after the program
  /// dropped its privileges, say): their events are not in the trace.
  public var unrecordedThreads: [Int32] = []
  /// Where each ended thread's events end in its file (`thread-end TID OFFSET`: appended when
  /// the thread exits, or for the thread that calls `exit`).
  public var threadEnds: [Int32: Int] = [:]
  /// Whether the process ran its exit (an `end` line): false for one killed, crashed, still
  /// running, or replaced by `exec`.
  public var ended = false
  /// The thread that installed a seccomp filter (`sandboxed TID`, appended by the agent just
  /// before): the agent made no system call after it, so each thread recorded to the end of the
  /// chunk it had, dropped (and counted) the rest, and the exit wrote no `end`.
  public var sandboxedBy: Int32?

  public init(
    session: String, pid: Int32, parent: Int32, executable: String, arguments: [String], ticksPerNanosecond: Double,
    startTicks: UInt64, startRealtimeNanoseconds: UInt64, objects: [Object], tracedFunctions: Int
  ) {
    self.session = session
    self.pid = pid
    self.parent = parent
    self.executable = executable
    self.arguments = arguments
    self.ticksPerNanosecond = ticksPerNanosecond
    self.startTicks = startTicks
    self.startRealtimeNanoseconds = startRealtimeNanoseconds
    self.objects = objects
    self.tracedFunctions = tracedFunctions
  }

  public var text: String {
    var lines = [
      "tracery-process 1", "session \(session)", "pid \(pid)", "ppid \(parent)",
      "executable \(TextField.escape(executable))",
      "ticks-per-ns \(ticksPerNanosecond)", "start-ticks \(startTicks)",
      "start-realtime-ns \(startRealtimeNanoseconds)",
      "traced-functions \(tracedFunctions)",
    ]
    if relocatedFunctions > 0 { lines.append("relocated-functions \(relocatedFunctions)") }
    if trappedFunctions > 0 { lines.append("trapped-functions \(trappedFunctions)") }
    if untracedFunctions > 0 { lines.append("untraced-functions \(untracedFunctions)") }
    lines += arguments.map { "argument \(TextField.escape($0))" }
    lines += objects.map(\.line)
    lines += threads.map { "thread \($0)" }
    lines += unrecordedThreads.map { "thread-unrecorded \($0)" }
    lines += threadEnds.sorted { $0.key < $1.key }.map { "thread-end \($0.key) \($0.value)" }
    if let sandboxedBy { lines.append("sandboxed \(sandboxedBy)") }
    if ended { lines.append("end") }
    // Not `joined(separator:)`: its unspecialized path looks up associated types by name at the
    // first call (~0.05 ms of every traced process's start, where the agent writes this).
    var text = ""
    for line in lines {
      text += line
      text += "\n"
    }
    return text
  }

  public init(text: String) throws(TraceError) {
    var fields: [String: String] = [:]
    var arguments: [String] = []
    var objects: [Object] = []
    let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
    guard lines.first == "tracery-process 1" else { throw .corrupt("not a Tracery process file") }
    var threads: [Int32] = []
    var threadEnds: [Int32: Int] = [:]
    var unrecorded: [Int32] = []
    var ended = false
    for line in lines.dropFirst() {
      if line == "end" {
        ended = true
        continue
      }
      // An empty value (`argument ` for an empty argument) is a value.
      let parts = line.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
      guard parts.count == 2 else { throw .corrupt("malformed line '\(line)'") }
      switch parts[0] {
      case "argument": arguments.append(TextField.unescape(parts[1]))
      case "thread":
        guard let tid = Int32(parts[1]) else { throw .corrupt("malformed thread line '\(line)'") }
        threads.append(tid)
      case "thread-unrecorded":
        guard let tid = Int32(parts[1]) else { throw .corrupt("malformed thread-unrecorded line '\(line)'") }
        unrecorded.append(tid)
      case "thread-end":
        let items = parts[1].split(separator: " ")
        guard items.count == 2, let tid = Int32(items[0]), let end = Int(items[1]), end >= 0 else {
          throw .corrupt("malformed thread-end line '\(line)'")
        }
        threadEnds[tid] = end
      case "object":
        // BIAS BUILDID PATH [SYMBOLS]: the path is escaped, so it holds no space.
        let items = parts[1].split(separator: " ").map(String.init)
        guard items.count == 3 || items.count == 4, items[0].hasPrefix("0x"),
          let bias = UInt64(items[0].dropFirst(2), radix: 16)
        else {
          throw .corrupt("malformed object line '\(line)'")
        }
        objects.append(
          Object(
            path: TextField.unescape(items[2]), bias: bias, buildID: items[1] == "-" ? nil : items[1],
            symbols: items.count == 4 ? items[3] : nil))
      default: fields[parts[0]] = parts[1]
      }
    }
    func field(_ key: String) throws(TraceError) -> String {
      guard let value = fields[key] else { throw .corrupt("missing '\(key)'") }
      return value
    }
    func number<T: LosslessStringConvertible>(_ key: String, as: T.Type) throws(TraceError) -> T {
      let text = try field(key)
      guard let value = T(text) else { throw .corrupt("'\(key)' is not a number: '\(text)'") }
      return value
    }
    let pid = try number("pid", as: Int32.self)
    let parent = try number("ppid", as: Int32.self)
    let rate = try number("ticks-per-ns", as: Double.self)
    guard rate > 0 else { throw .corrupt("'ticks-per-ns' is not positive") }
    let start = try number("start-ticks", as: UInt64.self)
    let realtime = try number("start-realtime-ns", as: UInt64.self)
    let traced = try number("traced-functions", as: Int.self)
    self.init(
      session: try field("session"), pid: pid, parent: parent, executable: TextField.unescape(try field("executable")),
      arguments: arguments, ticksPerNanosecond: rate, startTicks: start, startRealtimeNanoseconds: realtime,
      objects: objects, tracedFunctions: traced)
    self.threads = threads
    self.unrecordedThreads = unrecorded
    self.threadEnds = threadEnds
    self.ended = ended
    // (Written only when not 0, and not by recorders before trace-any-function.)
    relocatedFunctions = fields["relocated-functions"].flatMap { Int($0) } ?? 0
    trappedFunctions = fields["trapped-functions"].flatMap { Int($0) } ?? 0
    untracedFunctions = fields["untraced-functions"].flatMap { Int($0) } ?? 0
    sandboxedBy = fields["sandboxed"].flatMap { Int32($0) }
  }
}

/// Percent-escaping for one-line text fields (space, newline, percent and control characters).
public enum TextField {
  public static func escape(_ value: String) -> String {
    guard value.utf8.contains(where: needsEscape) else { return value }
    var bytes: [UInt8] = []
    appendEscaped(value, to: &bytes)
    return String(decoding: bytes, as: UTF8.self)
  }

  /// `escape(value)`'s bytes, appended to `bytes` (the agent writes thousands of names so).
  public static func appendEscaped(_ value: String, to bytes: inout [UInt8]) {
    let digits = Array("0123456789ABCDEF".utf8)
    for byte in value.utf8 {
      if needsEscape(byte) {
        bytes += [UInt8(ascii: "%"), digits[Int(byte >> 4)], digits[Int(byte & 15)]]
      } else {
        bytes.append(byte)
      }
    }
  }

  private static func needsEscape(_ byte: UInt8) -> Bool { byte <= 0x20 || byte == UInt8(ascii: "%") || byte == 0x7f }

  public static func unescape(_ value: String) -> String {
    var bytes: [UInt8] = []
    var iterator = Array(value.utf8).makeIterator()
    while let byte = iterator.next() {
      if byte == UInt8(ascii: "%"), let high = iterator.next(), let low = iterator.next(),
        let decoded = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
      {
        bytes.append(decoded)
      } else {
        bytes.append(byte)
      }
    }
    return String(decoding: bytes, as: UTF8.self)
  }
}

extension String {
  func leftPadded(to width: Int, with pad: Character = "0") -> String {
    count >= width ? self : String(repeating: pad, count: width - count) + self
  }
}

/// Why a trace directory could not be read.
public enum TraceError: Error, Equatable, CustomStringConvertible {
  case notFound(String)
  case corrupt(String)
  case empty(String)

  public var description: String {
    switch self {
    case .notFound(let what): return "no trace at \(what)"
    case .corrupt(let what): return "corrupt trace: \(what)"
    case .empty(let what): return "empty trace: \(what)"
    }
  }
}

/// The recording's `DIR/info` (written by `tracery record`, read by every reader): the first
/// line `tracery-trace 1`, then `key value` lines, values percent-escaped, in the order written.
/// Keys: `command`, `program`, `start`, `filter`, `patch`, `argument`, `retval`, and at the end
/// `exit-status` or `signal` (appended when the program ends).
public struct RecordingInfo: Sendable {
  public private(set) var fields: [(key: String, value: String)] = []

  public init(command: String, program: String, start: String) {
    add("command", command)
    add("program", program)
    add("start", start)
  }

  public mutating func add(_ key: String, _ value: String) { fields.append((key, value)) }

  /// The first value of `key`.
  public func value(_ key: String) -> String? { fields.first { $0.key == key }?.value }

  /// The record-time filter options (`-F`/`-N`/`-D`/`-t`), applied by every reader not given its own.
  public var filter: String? { value("filter") }

  public var text: String {
    (["tracery-trace 1"] + fields.map { "\($0.key) \(TextField.escape($0.value))" }).joined(separator: "\n") + "\n"
  }

  public init(text: String) throws(TraceError) {
    let lines = text.split(separator: "\n")
    guard lines.first == "tracery-trace 1" else { throw .corrupt("not a Tracery info file") }
    for line in lines.dropFirst() {
      let parts = line.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
      fields.append((parts[0], parts.count > 1 ? TextField.unescape(parts[1]) : ""))
    }
  }

  /// The line that says how the program ended, appended when it has.
  public static func endingLine(exitStatus: Int32) -> String { "exit-status \(exitStatus)\n" }
  public static func endingLine(signal: Int32) -> String { "signal \(signal)\n" }
}
