import CTraceryInject
import Foundation
import TraceryCore
import TraceryRecord

/// `tracery record -p PID`: attaches to a running process, records until Ctrl-C, `--duration`
/// or the process ends, and detaches leaving it running as before (see `Injector` for how the
/// agent gets in, `Agent.attach` in TraceryAgent for its side of the control protocol).
struct Attacher {
  let recorder: Recorder
  let pid: pid_t
  /// Nanoseconds to record, or nil: until Ctrl-C.
  let duration: Double?
  /// Says nothing on stderr (`bench attach`).
  var quiet = false

  /// When each step ended, for `bench attach`.
  struct Timing {
    /// The counter's reading when `run` began (events carry the same counter).
    var startTicks: UInt64 = 0
    var attachedNanoseconds: Double = 0
    var detachNanoseconds: Double = 0
  }
  private(set) var timing = Timing()

  /// Set by SIGINT while recording.
  nonisolated(unsafe) static var interrupted: sig_atomic_t = 0

  /// Records; returns the number of functions the agent traced.
  @discardableResult
  mutating func run(directory: String) throws -> Int {
    timing.startTicks = TimeStampCounter.now
    let start = ContinuousClock.now
    try Injector.preflight(pid)
    let agent = try Recorder.agentPath()
    let absolute = URL(fileURLWithPath: directory).standardizedFileURL.path
    if recorder.options.shared { AgentEnvironment.requestShared() }
    let executable =
      (try? FileManager.default.destinationOfSymbolicLink(
        atPath: "/proc/\(pid)/task/\(Injector.liveThread(of: pid))/exe"))
      ?? "process \(pid)"
    try Recorder.prepare(absolute, shared: recorder.options.shared)
    var info = recorder.recordingInfo(command: "attach \(pid)", program: executable)
    info.add("attached", String(pid))
    guard Files.write(info.text, to: absolute + "/info") else { throw UserError("cannot write \(absolute)/info") }
    let settings = absolute + "/attach-settings"
    guard Files.write(recorder.agentEnvironment(directory: absolute).settingsText, to: settings) else {
      throw UserError("cannot write \(settings)")
    }
    let socketPath = ControlSocket.path(in: absolute)
    let listener = try Self.listen(socketPath)
    defer {
      close(listener)
      unlink(socketPath)
      unlink(settings)
    }
    // A process of another user's (root attaching to a daemon): the agent runs as that user, and
    // records only into a directory of its own that only it may write: the directory, the
    // settings and the socket become its (this process, privileged, still reads them).
    if let owner = Self.owner(of: pid), owner.uid != geteuid() {
      for path in [absolute, settings, socketPath] where chown(path, owner.uid, owner.gid) != 0 {
        throw UserError("cannot give \(path) to the process's user: \(String(cString: strerror(errno)))")
      }
    }
    try Injector.inject(pid: pid, agent: agent, settings: settings)
    // The agent answers from its own thread once loaded (its first load measures the counter's
    // rate and reads the symbol tables: allow for big programs).
    let control = try accept(listener, agent: agent, timeoutMilliseconds: 20_000)
    defer { close(control) }
    var reader = LineReader(fd: control)
    guard let answer = reader.line(timeoutMilliseconds: 60_000) else {
      throw UserError("the agent in process \(pid) did not answer")
    }
    if let error = ControlSocket.argument(of: answer, after: ControlSocket.error) {
      throw UserError("process \(pid): \(error)")
    }
    guard let attached = ControlSocket.argument(of: answer, after: ControlSocket.attached),
      let functions = attached.split(separator: " ", maxSplits: 1).first.flatMap({ Int($0) })
    else {
      throw UserError("the agent in process \(pid) said '\(answer)'")
    }
    // "N U NAME: REASON": U functions the agent could not trace, the first one's reason.
    let untraced = attached.split(separator: " ", maxSplits: 2).dropFirst()
    let untracedNote =
      untraced.first.map { count in
        "; \(count) not traced" + (untraced.dropFirst().first.map { ", e.g. \($0)" } ?? "")
      } ?? ""
    timing.attachedNanoseconds = Self.nanoseconds(ContinuousClock.now - start)
    let oldInterrupt = signal(SIGINT) { _ in Attacher.interrupted = 1 }
    defer { signal(SIGINT, oldInterrupt) }
    Self.interrupted = 0
    let message =
      "tracery: attached to process \(pid) (\(functions) functions\(untracedNote)); recording "
      + (duration == nil ? "until Ctrl-C\n" : "for \(recorder.options.duration ?? "")\n")
    if !quiet { FileHandle.standardError.write(Data(message.utf8)) }
    let deadline = duration.map { DispatchTime.now().uptimeNanoseconds + UInt64($0) }
    var ended = false
    while Self.interrupted == 0 {
      if let deadline, DispatchTime.now().uptimeNanoseconds >= deadline { break }
      if reader.closed(timeoutMilliseconds: 50) {
        ended = true
        break
      }
    }
    if !ended {
      let stop = ContinuousClock.now
      ControlSocket.send(control, ControlSocket.line(ControlSocket.stop))
      guard reader.line(timeoutMilliseconds: 30_000) == ControlSocket.detached else {
        throw UserError("the agent in process \(pid) did not confirm its detach")
      }
      timing.detachNanoseconds = Self.nanoseconds(ContinuousClock.now - stop)
    }
    _ = Files.append(ended ? "process-ended\n" : "detached\n", to: absolute + "/info")
    Recorder.trimEventFiles(in: absolute)
    return functions
  }

  /// The effective user and group of `pid`.
  private static func owner(of pid: pid_t) -> (uid: uid_t, gid: gid_t)? {
    // "Uid:" and "Gid:" list real, effective, saved and file-system ids.
    func effective(_ name: String) -> UInt32? {
      Injector.statusField(name, of: "/proc/\(pid)/status")?.split(whereSeparator: \.isWhitespace).dropFirst()
        .first.flatMap { UInt32($0) }
    }
    guard let uid = effective("Uid"), let gid = effective("Gid") else { return nil }
    return (uid, gid)
  }

  private static func nanoseconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) * 1e9 + Double(duration.components.attoseconds) / 1e9
  }

  /// A Unix stream socket listening at `path` (only this user may connect: the trace directory
  /// is private, and the peer is checked on accept).
  private static func listen(_ path: String) throws -> Int32 {
    let fd = ControlSocket.socket()
    guard fd >= 0 else { throw UserError("cannot create a socket: \(String(cString: strerror(errno)))") }
    guard let bound = ControlSocket.withAddress(path, { bind(fd, $0, $1) }) else {
      close(fd)
      throw UserError("the trace directory's path is too long for a socket (\(path))")
    }
    guard bound == 0, chmod(path, 0o600) == 0, Glibc.listen(fd, 1) == 0 else {
      close(fd)
      throw UserError("cannot listen at \(path): \(String(cString: strerror(errno)))")
    }
    return fd
  }

  /// The agent's connection: from the process attached to, nothing else.
  private func accept(_ listener: Int32, agent: String, timeoutMilliseconds: Int32) throws -> Int32 {
    var waited: Int32 = 0
    while waited < timeoutMilliseconds {
      var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
      if poll(&poller, 1, 100) > 0 {
        let fd = Glibc.accept(listener, nil, nil)
        guard fd >= 0 else { continue }
        if ctracery_peer_pid(fd) == pid { return fd }
        close(fd)
        continue
      }
      waited += 100
      guard kill(pid, 0) == 0 || errno == EPERM else { throw UserError("process \(pid) ended while attaching") }
    }
    throw UserError(
      "the agent did not start in process \(pid) within \(timeoutMilliseconds / 1000) s (could it load "
        + "\(agent)?)")
  }
}

/// Lines from a socket, with timeouts.
struct LineReader {
  let fd: Int32
  private var pending: [UInt8] = []
  private(set) var isClosed = false

  init(fd: Int32) { self.fd = fd }

  /// The next line (without its newline), or nil at a timeout or the end.
  mutating func line(timeoutMilliseconds: Int32) -> String? {
    var waited: Int32 = 0
    while true {
      if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
        let line = String(decoding: pending[..<newline], as: UTF8.self)
        pending.removeSubrange(...newline)
        return line
      }
      guard !isClosed, waited < timeoutMilliseconds else { return nil }
      if !fill(timeoutMilliseconds: 100) { waited += 100 }
    }
  }

  /// Whether the other side closed (waits up to the timeout for something to read).
  mutating func closed(timeoutMilliseconds: Int32) -> Bool {
    _ = fill(timeoutMilliseconds: timeoutMilliseconds)
    return isClosed
  }

  /// Reads what is there within the timeout; false when nothing came.
  private mutating func fill(timeoutMilliseconds: Int32) -> Bool {
    var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    guard poll(&poller, 1, timeoutMilliseconds) > 0 else { return false }
    var buffer = [UInt8](repeating: 0, count: 256)
    let count = read(fd, &buffer, buffer.count)
    if count <= 0 {
      if count == 0 || errno != EINTR { isClosed = true }
      return false
    }
    pending += buffer.prefix(count)
    return true
  }
}
