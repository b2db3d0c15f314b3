#if canImport(Glibc)
  import Glibc
#endif

/// A trace directory, read whole: the recording's info, each process image, each thread's events.
public struct Trace: Sendable {
  public struct Thread: Sendable {
    public let session: String
    public let pid: Int32
    public let tid: Int32
    public let events: [Event]
    /// Events the recorder could not store (no buffer space): the trace is incomplete there.
    public let dropped: UInt64
  }

  public let directory: String
  /// The recording's `key value` lines (`command`, `start`, the record-time options).
  public let info: [(key: String, value: String)]
  public let processes: [ProcessInfo]
  public let threads: [Thread]

  public func value(_ key: String) -> String? { info.first { $0.key == key }?.value }

  public var droppedEvents: UInt64 { threads.reduce(0) { $0 + $1.dropped } }

  public init(directory: String) throws(TraceError) {
    self.directory = directory
    guard let names = Files.list(directory) else { throw .notFound(directory) }
    guard let infoText = Files.readText(directory + "/info") else {
      throw .notFound("\(directory) (no info file: not a trace directory)")
    }
    var info: [(key: String, value: String)] = []
    let lines = infoText.split(separator: "\n")
    guard lines.first == "tracery-trace 1" else { throw .corrupt("\(directory)/info is not a Tracery info file") }
    for line in lines.dropFirst() {
      let parts = line.split(separator: " ", maxSplits: 1).map(String.init)
      info.append((parts[0], parts.count > 1 ? TextField.unescape(parts[1]) : ""))
    }
    self.info = info
    var processes: [ProcessInfo] = []
    var threads: [Thread] = []
    for name in names.sorted() {
      let path = directory + "/" + name
      if name.hasPrefix("process-") && name.hasSuffix(".info") {
        guard let text = Files.readText(path) else { throw .corrupt("\(path) cannot be read") }
        do { processes.append(try ProcessInfo(text: text)) } catch { throw .corrupt("\(path): \(error)") }
      } else if name.hasSuffix(".events") {
        threads.append(try Self.readThread(path: path, name: name))
      }
    }
    let sessions = Set(processes.map(\.session))
    for thread in threads where !sessions.contains(thread.session) {
      throw .corrupt("\(directory): events of session \(thread.session) without its process file")
    }
    if processes.isEmpty { throw .empty("\(directory) has no traced process (did the program start?)") }
    self.processes = processes
    self.threads = threads.sorted { ($0.pid, $0.tid) < ($1.pid, $1.tid) }
  }

  static func readThread(path: String, name: String) throws(TraceError) -> Thread {
    // SESSION-TID.events, SESSION = PID.GENERATION
    let stem = name.dropLast(".events".count)
    guard let dash = stem.lastIndex(of: "-"), let tid = Int32(stem[stem.index(after: dash)...]) else {
      throw .corrupt("\(path): unexpected file name")
    }
    let session = String(stem[..<dash])
    guard let pid = Int32(session.split(separator: ".").first ?? "") else { throw .corrupt("\(path): bad session") }
    guard let bytes = Files.read(path) else { throw .corrupt("\(path) cannot be read") }
    guard bytes.count >= TraceFormat.headerSize else {
      throw .corrupt("\(path) is truncated (\(bytes.count) bytes, header is \(TraceFormat.headerSize))")
    }
    guard Array(bytes[0..<8]) == TraceFormat.magic else { throw .corrupt("\(path): bad magic") }
    let version = UInt32(bytes.load(TraceFormat.Header.version, count: 4))
    guard version == TraceFormat.version else { throw .corrupt("\(path): format version \(version)") }
    let dropped = bytes.load(TraceFormat.Header.dropped)
    let chunkSize = Int(bytes.load(TraceFormat.Header.chunkSize))
    guard chunkSize >= 16, chunkSize % 8 == 0 else { throw .corrupt("\(path): chunk size \(chunkSize)") }
    var events: [Event] = []
    events.reserveCapacity((bytes.count - TraceFormat.headerSize) / 12)
    var decoder = Event.Decoder()
    var offset = TraceFormat.headerSize
    while offset + 8 <= bytes.count {
      let word = bytes.load(offset)
      let chunkStart = offset - (offset - TraceFormat.headerSize) % chunkSize
      let chunkEnd = min(chunkStart + chunkSize, bytes.count)
      if word == 0 {
        // Unwritten: the end of the data, unless the writer left this chunk's tail for the next
        // chunk (an event that did not fit), which then has data.
        guard chunkEnd + 8 <= bytes.count, bytes.load(chunkEnd) != 0 else { break }
        offset = chunkEnd
        continue
      }
      let start = offset
      guard
        let (decoded, size) = decoder.decode(
          word, load: { start + $0 + 8 <= chunkEnd ? bytes.load(start + $0) : nil },
          byteAt: { start + $0 < chunkEnd ? bytes[start + $0] : nil })
      else { break }
      switch decoded {
      case .event(let event): events.append(event)
      case .values(let values):
        if !events.isEmpty { events[events.count - 1].values = values }
      }
      offset += size
    }
    return Thread(session: session, pid: pid, tid: tid, events: events, dropped: dropped)
  }
}

extension [UInt8] {
  /// The little-endian integer of `count` bytes at `offset`.
  func load(_ offset: Int, count: Int = 8) -> UInt64 {
    var value: UInt64 = 0
    for index in (0..<count).reversed() { value = value << 8 | UInt64(self[offset + index]) }
    return value
  }
}

/// Whole-file reads and directory listings without Foundation (the agent links this module).
public enum Files {
  public static func read(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    while true {
      let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
      if count < 0 && errno == EINTR { continue }
      guard count >= 0 else { return nil }
      if count == 0 { return result }
      result.append(contentsOf: chunk[0..<count])
    }
  }

  public static func readText(_ path: String) -> String? { read(path).map { String(decoding: $0, as: UTF8.self) } }

  /// Writes `text` to a new file (replacing any), in full.
  @discardableResult
  public static func write(_ text: String, to path: String) -> Bool { write(Array(text.utf8), to: path) }

  /// Writes `bytes` to a new file (replacing any), in full.
  @discardableResult
  public static func write(_ bytes: [UInt8], to path: String) -> Bool {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var written = 0
    while written < bytes.count {
      let count = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
      if count < 0 && errno == EINTR { continue }
      guard count > 0 else { return false }
      written += count
    }
    return true
  }

  public static func list(_ directory: String) -> [String]? {
    guard let dir = opendir(directory) else { return nil }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
        String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
      }
      if name != "." && name != ".." { names.append(name) }
    }
    return names
  }
}
