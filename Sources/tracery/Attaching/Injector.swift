import Foundation
import TraceryRecord
import TraceryX86

/// Loads the agent into a running process and starts its attach on a thread of its own
/// (`record -p`).
///
/// The process's main thread is stopped for a few remote calls only (`RemoteThread`): `mmap` of
/// one page for a loader, `pthread_create` of a thread that runs it; then every register goes
/// back and the thread runs on. The loader (written here with `X86Writer`) runs on the new
/// thread, so nothing the agent does happens inside whatever the stopped thread held (a lock
/// of the allocator, of the loader): `dlopen(agent)`, `dlsym("tracery_agent_attach")`, the call
/// (which records until told to stop, then detaches), and a tail call of `munmap` of its own page.
/// A second attach to the same process loads nothing new: `dlopen` finds the agent loaded.
///
/// The libc functions are found in the process at the same offsets as in this one: both must map
/// the same libc file (checked by device and inode).
enum Injector {
  /// What must hold before a process is touched; each refusal says why and what to do.
  static func preflight(_ pid: pid_t) throws {
    guard kill(pid, 0) == 0 || errno == EPERM else { throw UserError("no process \(pid)") }
    guard pid != getpid() else { throw UserError("tracery cannot attach to itself") }
    func field(_ name: String) -> String? { statusField(name, of: "/proc/\(pid)/status") }
    let privileged = Self.hasPtraceCapability()
    let scope = Int(procText("/proc/sys/kernel/yama/ptrace_scope").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    if scope >= 3 {
      throw UserError("kernel.yama.ptrace_scope is 3: ptrace is disabled on this system until it reboots")
    }
    if scope == 2, !privileged {
      throw UserError("kernel.yama.ptrace_scope is 2: attaching needs CAP_SYS_PTRACE (run tracery as root)")
    }
    if scope == 1, !privileged {
      throw UserError(
        "kernel.yama.ptrace_scope is 1: only a parent may trace a process; run tracery as root, or "
          + "'sysctl kernel.yama.ptrace_scope=0'")
    }
    if !privileged, let uids = field("Uid")?.split(whereSeparator: \.isWhitespace).compactMap({ UInt32($0) }),
      uids.contains(where: { $0 != geteuid() })
    {
      throw UserError("process \(pid) belongs to another user: attaching needs CAP_SYS_PTRACE (run tracery as root)")
    }
    if let tracer = field("TracerPid"), tracer != "0" {
      throw UserError("process \(pid) is already traced by process \(tracer) (a debugger?): detach it first")
    }
    if let seccomp = field("Seccomp"), seccomp != "0" {
      throw UserError(
        "process \(pid) runs under a seccomp filter (Seccomp: \(seccomp)): the calls attaching makes may be refused "
          + "or kill it; not attaching")
    }
    _ = try libcBase(in: pid)
  }

  /// A file of /proc as text, whole (they say their size is 0), or "".
  private static func procText(_ path: String) -> String {
    Files.read(path).map { String(decoding: $0, as: UTF8.self) } ?? ""
  }

  /// The value of the `NAME:` line of a /proc status file, without the spaces around it.
  static func statusField(_ name: String, of path: String) -> String? {
    procText(path).split(separator: "\n").first { $0.hasPrefix(name + ":") }.map {
      $0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces)
    }
  }

  /// Whether this process has CAP_SYS_PTRACE (bit 19 of its effective set).
  static func hasPtraceCapability() -> Bool {
    guard let field = statusField("CapEff", of: "/proc/self/status"), let bits = UInt64(field, radix: 16) else {
      return false
    }
    return bits & (1 << 19) != 0
  }

  /// Where libc is mapped in this process, as a file (device and inode) and address.
  private static func libc(in mapsPath: String) -> [(file: String, start: UInt64)] {
    let maps = procText(mapsPath)
    return maps.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ", omittingEmptySubsequences: true)
      guard fields.count >= 6, fields[2] == "00000000", fields[5].contains("/libc.so"),
        let start = UInt64(fields[0].split(separator: "-")[0], radix: 16)
      else { return nil }
      return ("\(fields[3]) \(fields[4])", start)
    }
  }

  /// The offset of `pid`'s libc from this process's (the same file in both).
  private static func libcBase(in pid: pid_t) throws -> Int64 {
    guard let own = libc(in: "/proc/self/maps").first else { throw UserError("this process maps no libc") }
    // (Through a live thread: a main thread that has exited shows no mappings.)
    let theirs = libc(in: "/proc/\(pid)/task/\(liveThread(of: pid))/maps")
    guard !theirs.isEmpty else {
      throw UserError("process \(pid) does not load libc (statically linked?): the agent cannot be loaded into it")
    }
    guard let match = theirs.first(where: { $0.file == own.file }) else {
      throw UserError(
        "process \(pid) maps another libc than tracery's (another root or container?): the agent cannot be loaded")
    }
    return Int64(bitPattern: match.start &- own.start)
  }

  /// The thread to stop: the main one, unless it has exited (`pthread_exit` in main leaves it a
  /// zombie, which ptrace cannot stop) while others run.
  static func liveThread(of pid: pid_t) -> pid_t {
    func isZombie(_ tid: String) -> Bool {
      statusField("State", of: "/proc/\(pid)/task/\(tid)/status")?.hasPrefix("Z") == true
    }
    guard isZombie(String(pid)) else { return pid }
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.compactMap { Int32($0) }.sorted().first { !isZombie(String($0)) } ?? pid
  }

  /// The address in `pid` of libc's `name`.
  private static func function(_ name: String, offset: Int64) throws -> UInt64 {
    guard let address = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else {
      throw UserError("libc has no \(name)")
    }
    return UInt64(UInt(bitPattern: address)) &+ UInt64(bitPattern: offset)
  }

  /// Loads `agent` into `pid` and starts `tracery_agent_attach(settings)` on a new thread of its.
  static func inject(pid: pid_t, agent: String, settings: String) throws {
    let offset = try libcBase(in: pid)
    let mmap = try function("mmap", offset: offset)
    let pthreadCreate = try function("pthread_create", offset: offset)
    let dlopen = try function("dlopen", offset: offset)
    let dlsym = try function("dlsym", offset: offset)
    let munmap = try function("munmap", offset: offset)
    var thread = try RemoteThread(process: pid, tid: liveThread(of: pid))
    defer { thread.detach() }
    let pageSize: UInt64 = 4096
    let page = try thread.call(
      mmap, 0, pageSize, UInt64(PROT_READ | PROT_EXEC), UInt64(MAP_PRIVATE | MAP_ANONYMOUS), UInt64.max, 0)
    guard page != 0, page < UInt64.max - 4095 else { throw UserError("mmap in process \(pid) failed") }
    let data = page + 1024
    var strings: [UInt8] = []
    func add(_ text: String) -> UInt64 {
      let at = data + UInt64(strings.count)
      strings += Array(text.utf8) + [0]
      return at
    }
    let agentPath = add(agent)
    let symbol = add("tracery_agent_attach")
    let settingsPath = add(settings)
    guard strings.count <= Int(pageSize) - 1024 else { throw UserError("paths too long for the loader") }
    let code = try loader(
      at: page, agent: agentPath, symbol: symbol, settings: settingsPath, dlopen: dlopen, dlsym: dlsym,
      munmap: munmap, pageSize: pageSize)
    try thread.write(code, at: page)
    try thread.write(strings, at: data)
    let slot = thread.scratchWord
    let created = try thread.call(pthreadCreate, slot, 0, page, 0)
    guard created == 0 else {
      _ = try? thread.call(munmap, page, pageSize)
      throw UserError("pthread_create in process \(pid) failed (\(created))")
    }
  }

  /// The loader thread's code at `page`: dlopen the agent, find its attach function, call it with
  /// the settings path, then unmap this page (a tail call: munmap returns to the thread's start).
  private static func loader(
    at page: UInt64, agent: UInt64, symbol: UInt64, settings: UInt64, dlopen: UInt64, dlsym: UInt64,
    munmap: UInt64, pageSize: UInt64
  ) throws -> [UInt8] {
    var w = X86Writer(base: page)
    let out = w.newLabel()
    w.putPush(.rbx)  // rsp 16-byte aligned at the calls
    w.putMov(.rdi, immediate: agent)
    w.putMov(.rsi, immediate: UInt64(RTLD_NOW))
    w.putMov(.rax, immediate: dlopen)
    w.putCall(.rax)
    w.putTest(.rax, .rax)
    w.putJcc(.equal, out)
    w.putMov(.rdi, .rax)
    w.putMov(.rsi, immediate: symbol)
    w.putMov(.rax, immediate: dlsym)
    w.putCall(.rax)
    w.putTest(.rax, .rax)
    w.putJcc(.equal, out)
    w.putMov(.rdi, immediate: settings)
    w.putCall(.rax)
    w.bind(out)
    w.putPop(.rbx)
    w.putMov(.rdi, immediate: page)
    w.putMov(.rsi, immediate: pageSize)
    w.putMov(.rax, immediate: munmap)
    w.putJmp(.rax)
    return try w.finish()
  }
}
