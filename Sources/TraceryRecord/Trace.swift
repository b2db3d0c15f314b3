#if canImport(Glibc)
  import Glibc
#endif

/// A trace directory: the recording's info, each process image, each thread's event file. The
/// events themselves are read as they are needed (`EventCursor`, `TraceStream`): memory does not
/// grow with the trace.
public struct Trace: Sendable {
  /// One thread's events, read whole (`readThread`, for tests).
  public struct Thread: Sendable {
    public let session: String
    public let pid: Int32
    public let tid: Int32
    public let events: [Event]
    /// Events the recorder could not store (no buffer space): the trace is incomplete there.
    public let dropped: UInt64
    /// The thread's name when it started recording (empty when unknown).
    public var name = ""
  }

  public let directory: String
  /// The recording's `DIR/info` (`command`, `start`, the record-time options, how it ended).
  public let info: RecordingInfo
  public let processes: [TracedProcess]
  /// Every thread's file, by pid then tid.
  public let threads: [ThreadFile]
  /// What could not be read when the directory was opened (files that are not events at all, a
  /// bad or missing process file). Damage inside events is found as they are read.
  public let damage: [Damage]

  public var droppedEvents: UInt64 { threads.total { $0.dropped } }

  /// Opens the directory. Throws only when it is not a trace at all (no directory, no info
  /// file); a damaged, missing or unreadable part is skipped and listed in `damage`.
  public init(directory: String) throws(TraceError) {
    self.directory = directory
    guard let names = Files.list(directory) else { throw .notFound(directory) }
    guard let infoText = Files.readText(directory + "/info") else {
      throw .notFound("\(directory) (no info file: not a trace directory)")
    }
    do { info = try RecordingInfo(text: infoText) } catch { throw .corrupt("\(directory)/info: \(error)") }
    var processes: [TracedProcess] = []
    var threads: [ThreadFile] = []
    var damage: [Damage] = []
    for name in names.sorted() {
      let path = directory + "/" + name
      if name.hasPrefix("process-") && name.hasSuffix(".info") {
        guard let text = Files.readText(path) else {
          damage.append(Damage(file: path, offset: 0, bytes: 0, reason: "cannot be read"))
          continue
        }
        do { processes.append(try TracedProcess(text: text)) } catch {
          damage.append(Damage(file: path, offset: 0, bytes: text.utf8.count, reason: "\(error)"))
        }
      } else if name.hasSuffix(".events") {
        let (thread, found) = ThreadFile.open(path: path, name: name)
        if let thread { threads.append(thread) }
        if let found { damage.append(found) }
      }
    }
    let sessions = Set(processes.map(\.session))
    for session in Set(threads.map(\.session)).subtracting(sessions).sorted() {
      damage.append(
        Damage(
          file: "\(directory)/process-\(session).info", offset: 0, bytes: 0,
          reason: "missing: the events of session \(session) are shown with addresses and another process's clock"))
    }
    // What each process file says was written: a listed thread's file that is gone, and where
    // each ended thread's events end (the cursor reports bytes past it, or a file cut before it).
    var index: [String: Int] = [:]
    for (position, thread) in threads.enumerated() { index["\(thread.session)-\(thread.tid)"] = position }
    let reported = Set(damage.map(\.file))
    for process in processes {
      for tid in process.threads where index["\(process.session)-\(tid)"] == nil {
        let path = "\(directory)/\(process.session)-\(tid).events"
        guard !reported.contains(path) else { continue }
        damage.append(
          Damage(
            file: path, offset: 0, bytes: process.threadEnds[tid].map { max(0, $0 - TraceFormat.headerSize) } ?? 0,
            reason: "missing: process-\(process.session).info lists thread \(tid), whose events it held"))
      }
      for (tid, end) in process.threadEnds {
        if let position = index["\(process.session)-\(tid)"] { threads[position].writtenEnd = end }
      }
    }
    if processes.isEmpty && threads.isEmpty {
      throw .empty("\(directory) has no traced process (did the program start?)")
    }
    self.processes = processes
    self.threads = threads.sorted { ($0.pid, $0.tid) < ($1.pid, $1.tid) }
    self.damage = damage
  }

  /// One line per damaged file: what was wrong first, and what was skipped in all.
  public static func summary(of damage: [Damage]) -> [String] {
    var order: [String] = []
    var byFile: [String: [Damage]] = [:]
    for item in damage {
      if byFile[item.file] == nil { order.append(item.file) }
      byFile[item.file, default: []].append(item)
    }
    return order.map { file in
      let items = byFile[file]!
      let first = items[0]
      let bytes = items.reduce(0) { $0 + $1.bytes }
      let more = items.count > 1 ? " (and \(items.count - 1) more place\(items.count > 2 ? "s" : ""))" : ""
      // A whole file, or damage that cost no bytes (a checksum that does not match).
      guard first.offset > 0, bytes > 0 else { return "\(file): \(first.reason)\(more)" }
      return
        "\(file): damaged at offset \(first.offset) (\(first.reason))\(more): \(bytes) bytes skipped, "
        + "about \(items.reduce(0) { $0 + $1.eventsSkipped }) events lost"
    }
  }

  /// The clock of each session: nanoseconds since the earliest process's start for a counter
  /// reading. A thread whose process file is missing gets another process's (one machine, one
  /// counter).
  public func clocks() -> [String: Clock] {
    let origin = processes.map(\.startRealtimeNanoseconds).min() ?? 0
    var result: [String: Clock] = [:]
    for process in processes {
      result[process.session] = Clock(
        rate: process.ticksPerNanosecond, startTicks: process.startTicks,
        offset: Double(process.startRealtimeNanoseconds &- origin))
    }
    let fallback = processes.first.map { Clock(rate: $0.ticksPerNanosecond, startTicks: $0.startTicks, offset: 0) }
    for thread in threads where result[thread.session] == nil {
      result[thread.session] = fallback ?? Clock(rate: 1, startTicks: 0, offset: 0)
    }
    return result
  }
}

/// Counter ticks → nanoseconds on the trace's one time line.
public struct Clock: Sendable {
  public let rate: Double
  public let startTicks: UInt64
  public let offset: Double

  public func nanoseconds(_ ticks: UInt64) -> Double { offset + (Double(ticks) - Double(startTicks)) / rate }
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
    // Read straight into uninitialized memory sized by the file (zeroing it first cost as much
    // as the read: a traced cc1's 7.7 MB of kept entry points); files in /proc say 0: grow.
    var status = stat()
    let expected = fstat(fd, &status) == 0 ? max(Int(status.st_size), 0) : 0
    var result: [UInt8] = []
    var room = max(expected + 1, 4096)
    while true {
      var failed = false
      var ended = false
      let chunk = [UInt8](unsafeUninitializedCapacity: room) { buffer, count in
        count = 0
        while count < buffer.count {
          let read = Glibc.read(fd, buffer.baseAddress! + count, buffer.count - count)
          if read < 0 && errno == EINTR { continue }
          guard read > 0 else {
            (failed, ended) = (read < 0, true)
            return
          }
          count += read
        }
      }
      if failed { return nil }
      if result.isEmpty { result = chunk } else { result += chunk }
      if ended { return result }
      room = max(result.count, 4096)
    }
  }

  public static func readText(_ path: String) -> String? { read(path).map { String(decoding: $0, as: UTF8.self) } }

  /// The first bytes of a file (at most `count`; one read).
  public static func readPrefix(_ path: String, count: Int) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: count)
    let read = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, count) }
    return read >= 0 ? Array(bytes.prefix(read)) : nil
  }

  /// Writes `text` to a file (replacing any), in full (see `write(_:to:)` for bytes).
  @discardableResult
  public static func write(_ text: String, to path: String) -> Bool { write(Array(text.utf8), to: path) }

  /// Writes `bytes` to a file (replacing any, never through a symbolic link), in full, with the
  /// trace's file mode (`TraceFormat.fileMode`) when it creates it.
  @discardableResult
  public static func write(_ bytes: [UInt8], to path: String) -> Bool {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, TraceFormat.fileMode)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    return write(bytes, toDescriptor: fd)
  }

  /// Writes `bytes` to `path` under a private name (PATH.PID) and renames it there, so that a
  /// reader (another process of the trace) never sees half a file; nothing is left on failure.
  public static func writeReplacing(_ bytes: [UInt8], at path: String) {
    let temporary = "\(path).\(getpid())"
    if write(bytes, to: temporary) { rename(temporary, path) } else { unlink(temporary) }
  }

  /// Writes `bytes` in full at `fd`'s offset.
  ///
  /// (A file the caller has just created is best written through the descriptor that created
  /// it: reopened with O_TRUNC, ext4 flushes it to disk at its close — the "replace by
  /// truncate" safeguard —, ~0.1 ms of every traced process's start.)
  ///
  /// Nothing is written past the process's file-size limit (RLIMIT_FSIZE): growing a file past
  /// it raises SIGXFSZ, which kills by default, and a traced program may have lowered it
  /// (OpenSSH's sandboxed child sets it to 0, then the agent appended a line and killed it).
  @discardableResult
  public static func write(_ bytes: [UInt8], toDescriptor fd: Int32) -> Bool {
    var status = stat()
    if fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG {
      let start = fcntl(fd, F_GETFL) & O_APPEND != 0 ? Int(status.st_size) : Int(lseek(fd, 0, SEEK_CUR))
      guard start >= 0, EventFile.fits(start + bytes.count) else { return false }
    }
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
