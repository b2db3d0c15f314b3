import CTraceryAgent
import CTraceryShims
import Synchronization
import TraceryCore
import TraceryELF
import TraceryRecord

#if canImport(Glibc)
  import Glibc
#endif

/// `tracery record -p PID`: the agent loaded into a running program (the CLI's injector started a
/// thread that `dlopen`ed it and called `tracery_agent_attach`).
///
/// It answers over `ControlSocket` (`DIR/control`, the CLI listens): `attached N` or `error`,
/// then waits for `stop` (or the connection's end) and answers `detached`.
///
/// The attach runs on the injected thread, which lives until the detach and then ends (it is
/// detached, nobody joins it). Detaching takes every site out in one batch, then sends each
/// thread that ever recorded to its refill at its next event (`forceRefills`), where it closes
/// its file of this recording itself (`ThreadRecording`): calls that began while attached still
/// end on trampolines and stubs the reclaimer keeps until no thread is in them, and their exits
/// land in that file. Attaching again finds the agent loaded and records into the new directory.
extension Agent {
  /// What the recorder's refill (and a thread's exit) reads — the configuration, the session, the
  /// process file, the recording's number — is changed by an attach or a detach while the
  /// program's threads run: they would read Swift strings being replaced. Bit 0 set: being
  /// changed (`stopRefills`); the other bits count the refills in flight, 2 each. A refill that
  /// finds it set drops its event; a thread's exit waits.
  static let refillGate = Atomic<Int>(0)

  /// false: do not read the shared state (being changed); else call `leaveRefill` when done.
  static func enterRefill() -> Bool {
    guard refillGate.add(2, ordering: .sequentiallyConsistent).newValue & 1 != 0 else { return true }
    refillGate.subtract(2, ordering: .sequentiallyConsistent)
    return false
  }

  static func waitToEnterRefill() {
    while !enterRefill() { usleep(50) }
  }

  static func leaveRefill() { refillGate.subtract(2, ordering: .sequentiallyConsistent) }

  /// Closes the gate and waits until no refill reads the shared state.
  static func stopRefills() {
    refillGate.bitwiseOr(1, ordering: .sequentiallyConsistent)
    while refillGate.load(ordering: .sequentiallyConsistent) != 1 { usleep(20) }
  }

  static func allowRefills() { refillGate.bitwiseAnd(~1, ordering: .sequentiallyConsistent) }

  /// One attach or detach at a time.
  nonisolated(unsafe) static let attachLock: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()

  static func attach(settingsPath: String) {
    pthread_detach(pthread_self())
    guard let bytes = Files.read(settingsPath),
      let environment = AgentEnvironment(settingsText: String(decoding: bytes, as: UTF8.self))
    else { return }
    let control = connectControl(ControlSocket.path(in: environment.directory))
    guard control >= 0 else { return }
    defer { close(control) }
    pthread_mutex_lock(attachLock)
    defer { pthread_mutex_unlock(attachLock) }
    guard recorder == nil, configuration == nil else {
      ControlSocket.send(
        control, ControlSocket.line(ControlSocket.error, "the agent in this process is recording already"))
      return
    }
    // Closed until `start` has named the session and written the process file (it opens it
    // before patching).
    stopRefills()
    recording &+= 1
    attachError = nil
    objects = []
    objectSites = [:]
    forceRefills()
    start(environment, attaching: true)
    allowRefills()
    guard recorder != nil else {
      configuration = nil
      var reason = (attachError ?? "").split(separator: "\n").first.map(String.init) ?? ""
      if Tracer.shared.relocatesPrologues, !Tracer.threadsCanBeMoved() {
        reason +=
          " (a thread blocks signal \(ctracery_snapshot_signal()), SIGRTMAX-1: no prologue or gcc NOP sled can be "
          + "moved while it cannot be looked at)"
      }
      ControlSocket.send(control, ControlSocket.line(ControlSocket.error, "no function could be traced: \(reason)"))
      return
    }
    // "N", or "N U NAME: REASON" when U functions could not be traced (the first one's reason).
    var answer = String(tracedFunctions)
    if untracedFunctions > 0 {
      answer += " \(untracedFunctions)"
      if let first = recorder?.attachFailures.first, case .failed(let reason) = first.outcome {
        answer += " \(first.function): \(reason)".split(separator: "\n").first.map(String.init) ?? ""
      }
    }
    followDlopen()
    ControlSocket.send(control, ControlSocket.line(ControlSocket.attached, answer))
    waitForStop(control)
    detach()
    ControlSocket.send(control, ControlSocket.line(ControlSocket.detached))
  }

  /// Every site back in one batch; the recording ends (see the type's comment).
  static func detach() {
    unfollowDlopen()
    // (A dlopen in flight finishes its `loaded` first: it reads what is torn down here.)
    pthread_mutex_lock(loadLock)
    defer { pthread_mutex_unlock(loadLock) }
    ValueRecorder.detach()
    recorder?.detach()
    recorder = nil
    // The stubs' sites are back to NOPs: the library calls go straight to their functions again.
    LibraryCalls.uninstall(libraryCallStubs)
    libraryCallStubs = []
    stopRefills()
    configuration?.traceDirectory.close()
    configuration = nil
    recording &+= 1
    EventFile.sealLeftChunks()
    appendToProcessFile("end")
    processFile?.close()
    processFile = nil
    allowRefills()
    forceRefills()
    Tracer.shared.reclaim()
  }

  /// Sends every thread that has recorded to its refill at its next event (its chunk's end set
  /// to 0: a plain store into its state; at worst a thread in its refill just then keeps its old
  /// file one chunk longer).
  static func forceRefills() {
    var states = [UInt64](repeating: 0, count: 4096)
    let count = ctracery_shadow_threads(&states, states.count)
    for state in states.prefix(max(0, count)) {
      UnsafeMutablePointer<ctracery_thread>(bitPattern: UInt(state))?.pointee.event_end = 0
    }
  }

  /// The program's and its libraries' GOT slots for `dlopen` and `dlclose`, pointed at the
  /// agent's hooks while attached (`agent.c`): objects loaded meanwhile are traced as they are
  /// when the agent is preloaded. Each: the slot, what it held (a function, or its PLT's lazy
  /// path), and what it was given.
  nonisolated(unsafe) static var dlopenSlots: [(slot: UInt64, held: UInt64, code: UInt64)] = []

  static func followDlopen() {
    // Not in the global scope, the agent finds the functions the program would reach there.
    guard let open = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "dlopen"),
      let close = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "dlclose")
    else { return }
    tracery_agent_set_next(open, close)
    let codes = ["dlopen": tracery_agent_dlopen_code(), "dlclose": tracery_agent_dlclose_code()]
    for object in ProcessObjects.list() where !object.path.contains("libtracery-agent") {
      guard let slots = try? ELFFile(path: object.path).importSlots() else { continue }
      for entry in slots {
        guard let code = codes[entry.name] else { continue }
        let slot = entry.slot &+ object.bias
        if let held = LibraryCalls.exchange(slot: slot, with: code) { dlopenSlots.append((slot, held, code)) }
      }
    }
    tracery_agent_following_set(1)
  }

  /// The slots back as they were (those nothing changed since); the hooks stop.
  static func unfollowDlopen() {
    tracery_agent_following_set(0)
    for entry in dlopenSlots { _ = LibraryCalls.exchange(slot: entry.slot, with: entry.held, ifHolding: entry.code) }
    dlopenSlots = []
  }

  /// Blocks until the CLI says `stop` or closes the connection.
  private static func waitForStop(_ control: Int32) {
    var buffer = [UInt8](repeating: 0, count: 256)
    var line: [UInt8] = []
    while true {
      let count = read(control, &buffer, buffer.count)
      if count < 0, errno == EINTR { continue }
      guard count > 0 else { return }
      line += buffer.prefix(count)
      if line.contains(UInt8(ascii: "\n")) { return }
    }
  }

  /// A connected Unix stream socket to `path`, or -1.
  private static func connectControl(_ path: String) -> Int32 {
    let fd = ControlSocket.socket()
    guard fd >= 0 else { return -1 }
    guard ControlSocket.withAddress(path, { connect(fd, $0, $1) }) == 0 else {
      close(fd)
      return -1
    }
    return fd
  }
}

@_cdecl("tracery_agent_attach")
public func traceryAgentAttach(_ settings: UnsafePointer<CChar>) {
  Agent.guarded { Agent.attach(settingsPath: String(cString: settings)) }
}
