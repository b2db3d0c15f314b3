import CTracery
import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// Generated code or data in the arena, live (a site reaches it) or retired (waiting for the
/// `Reclaimer`), and what must live as long as it. A class: functions hold it while live, the
/// reclaimer once retired, and a reference keeps the function's bookkeeping small (it is copied
/// a few times per commit).
///
/// Protocol: created, changed and retired under the tracer's lock; `unwind` is set once, when
/// the commit that made it settles (hence `@unchecked Sendable`: the lock orders every access).
final class CodeImage: @unchecked Sendable {
  let block: CodeArena.Block
  let length: Int
  /// Unwind rows of a per-function trampoline (nil for graph images, which have none).
  let frame: UnwindInfo.Frame?
  /// The unwind table of the commit that made it, which owns `block` (nil: no unwinder, or
  /// not yet live; then the block is released directly).
  var unwind: UnwindInfo?
  let counters: [AttachmentCounters]
  /// Data the code reads (an ops table), freed with it.
  var keepAlive: (any AnyObject & Sendable)? = nil
  /// Arena blocks reachable only through this one (the records of a detached hash-mode bulk
  /// link, reached through a retired hash table): busy when any of them or it is referenced,
  /// released with it.
  var companions: [CodeArena.Block] = []
  /// Start addresses of other blocks this code goes to without leaving a return address behind
  /// (a graph stub jumps to its image's return handler and calls it, or the function's
  /// trampoline, from where a stack scan cannot tell): while this one is busy, so are they.
  var leadsTo: [UInt64] = []

  init(
    block: CodeArena.Block, length: Int, frame: UnwindInfo.Frame?, unwind: UnwindInfo?, counters: [AttachmentCounters],
    keepAlive: (any AnyObject & Sendable)? = nil
  ) {
    self.block = block
    self.length = length
    self.frame = frame
    self.unwind = unwind
    self.counters = counters
    self.keepAlive = keepAlive
  }

  /// A block that is data or code with no unwind rows and no counters.
  convenience init(block: CodeArena.Block, length: Int) {
    self.init(block: block, length: length, frame: nil, unwind: nil, counters: [])
  }
}

/// Frees retired trampolines once no thread can be inside them: the user-space form of the
/// kernel's trampoline image refcount + RCU-tasks, with nothing on the traced call's path.
///
/// Why this is enough: a trampoline is retired only after its site stopped pointing at it and
/// every core was synced, so no thread can enter it again. A thread still "inside" it is running
/// its code (rip in it), or has an address in it on its stack (a return address: the original
/// or a handler was called from it, or a signal frame saved a rip in it). A thread can only drop
/// such references, never gain new ones, so a conservative scan may race with the thread and
/// still never miss one. Any word that looks like an address inside an image keeps it busy.
/// Data (a multi-attach record or table) is also referenced by a register between a global
/// trampoline's load of its address and its store into the frame's hazard slot: a running
/// thread's registers are checked too, so that lookup needs no re-check after the store.
///
/// Per thread (/proc/self/task): a thread blocked in a system call has its rip and rsp in
/// /proc/self/task/TID/syscall and is not disturbed; any other thread gets a snapshot signal
/// whose handler reports its registers (after a few looks, `runningLooks`; a sleeping call the
/// signal lands in anyway is put back by the handler, shims.c `restart_interrupted_call`). The
/// stack is scanned from rsp to the end of its mapping. A thread that does not answer within
/// 50 ms keeps everything busy (try again later). Reclaiming never waits on a sleeping thread.
///
/// Function-graph frames can hold a return into a stub on a stack no thread is running on (a
/// coroutine suspended inside a traced call): every thread's live shadow frames are read too
/// (`scanShadowStacks`). A stub keeps the code it jumps to busy (`CodeImage.leadsTo`).
///
/// Limitations: a thread that is running (CPU-bound, never blocking in a system call) and blocks
/// the snapshot signal (SIGRTMAX - 1) cannot be inspected without ptrace, so while such a thread
/// exists retired images stay allocated; `Tracer.reclaimObstacle` says which thread. Likewise
/// while a running thread executes a signal handler on its alternate stack (the stack it
/// interrupted may hold returns into trampolines, and only the handler's is known). A thread
/// *blocked* in such a handler is scanned from the alternate stack only: a per-function
/// trampoline's return address on the interrupted stack is not seen there (graph frames are).
///
/// Protocol: called only under the tracer's lock.
struct Reclaimer {

  private(set) var retired: [CodeImage] = []
  /// Why the last pass freed nothing although images were retired (nil when it could look).
  private(set) var lastObstacle: String?

  mutating func retire(_ image: CodeImage) { retired.append(image) }

  /// Retires each of `images` whose entry no site calls; returns the others.
  mutating func retire<Image>(
    _ images: [Image], unlessCalled called: Set<UInt64>, entry: (Image) -> UInt64, image: (Image) -> CodeImage
  ) -> [Image] {
    var kept: [Image] = []
    for candidate in images {
      if called.contains(entry(candidate)) { kept.append(candidate) } else { retire(image(candidate)) }
    }
    return kept
  }

  /// When a commit should also try to reclaim: a pass signals every running thread, so it is
  /// done once enough has been retired or enough time has passed, not on every change.
  /// `Tracer.reclaim()` always tries.
  /// After a pass that could not inspect every thread, automatic passes back off (doubling up
  /// to `maximumInterval`), so that commits stay prompt in a process whose running threads block
  /// the snapshot signal.
  static let retiredThreshold = 64
  /// Nanoseconds (`System.monotonicNanoseconds`).
  static let interval: UInt64 = 200_000_000
  static let maximumInterval: UInt64 = 10_000_000_000
  private var lastPass = System.monotonicNanoseconds()
  private var backoff = Reclaimer.interval

  /// `now`: `System.monotonicNanoseconds()`.
  func isDue(now: UInt64) -> Bool {
    guard !retired.isEmpty else { return false }
    if now >= lastPass && now - lastPass >= backoff { return true }
    // Many retired images: try at once, unless the last pass failed (then wait out the backoff).
    return retired.count >= Self.retiredThreshold && backoff == Self.interval
  }

  /// Frees every retired trampoline no thread references; returns how many were freed.
  /// `callerStack` is a stack address of this thread above every frame of Tracer's own (see
  /// `withCallerStackMarker`): this thread is scanned from there up, so the reclaimer's own
  /// locals, which hold image addresses, are not mistaken for references.
  mutating func reclaim(arena: CodeArena, callerStack: UInt64) -> Int {
    guard !retired.isEmpty else { return 0 }
    lastPass = System.monotonicNanoseconds()
    var ranges: [Range<UInt64>] = []
    var owners: [Int] = []
    ranges.reserveCapacity(retired.count)
    owners.reserveCapacity(retired.count)
    for (index, image) in retired.enumerated() {
      ranges.append(image.block.range)
      owners.append(index)
      for block in image.companions {
        ranges.append(block.range)
        owners.append(index)
      }
    }
    var busy: Set<Int>
    switch Self.busyRanges(ranges, callerStack: callerStack) {
    case .success(let found):
      busy = Set(found.keys.map { owners[$0] })
      lastObstacle = nil
      backoff = Self.interval
    case .failure(let obstacle):
      lastObstacle = obstacle.reason
      backoff = min(backoff * 2, Self.maximumInterval)
      return 0
    }
    busy = Self.closing(busy, over: retired)
    var kept: [CodeImage] = []
    var released: [CodeArena.Block] = []
    for (index, image) in retired.enumerated() {
      if busy.contains(index) {
        kept.append(image)
        continue
      }
      released += image.companions
      if image.unwind == nil { released.append(image.block) }
      // With an unwind table, dropping the record is the release: the table returns its blocks
      // when the last trampoline of its commit is gone.
    }
    let freed = retired.count - kept.count
    retired = kept
    arena.release(contentsOf: released)
    return freed
  }

  /// `busy` and every retired block a busy one leads to (`CodeImage.leadsTo`), transitively.
  static func closing(_ busy: Set<Int>, over retired: [CodeImage]) -> Set<Int> {
    guard !busy.isEmpty else { return busy }
    var byStart: [UInt64: Int] = [:]
    for (index, image) in retired.enumerated() { byStart[image.block.address] = index }
    var closed = busy
    var pending = Array(busy)
    while let index = pending.popLast() {
      for start in retired[index].leadsTo {
        if let next = byStart[start], closed.insert(next).inserted { pending.append(next) }
      }
    }
    return closed
  }

  struct Obstacle: Error {
    let reason: String
  }

  /// How many times a pass looks (200 µs apart) for a running thread to block in a system call
  /// before it signals it. A signal handler run while a thread sleeps in `nanosleep`, `poll`,
  /// `epoll_wait` or `select` makes that call fail with EINTR even with SA_RESTART, and a thread
  /// seen running between two such sleeps is often inside the next one before the signal lands
  /// (`record -p --libcall` on running.c's sleeper showed it). A thread that sleeps most of the
  /// time is nearly always seen blocked on a later look; a busy one costs the pass ~0.6 ms.
  /// This narrows the window; a signal that lands in such a call anyway, the handler puts the
  /// call back when it can tell which it was (shims.c `restart_interrupted_call`).
  static let runningLooks = 4

  /// Where a thread was seen to reference a range: the first sighting, for the messages of
  /// those that refuse because of it (a stack word may be a live frame's or a stale one left in
  /// a slot no frame has written since: the scan cannot tell them apart).
  struct Holder: CustomStringConvertible, Equatable {
    enum Place: Equatable {
      case instructionPointer
      case register
      /// `offset` bytes above the thread's stack pointer.
      case stack(offset: UInt64)
      /// A function-graph frame's return address or the slot it was taken from.
      case shadowStack
    }
    /// The thread's id, or 0 for a shadow stack (its thread is not known there).
    let thread: Int32
    let place: Place
    let value: UInt64

    var description: String {
      let at =
        switch place {
        case .instructionPointer: "rip"
        case .register: "a register"
        case .stack(let offset): "its stack at rsp+0x\(String(offset, radix: 16))"
        case .shadowStack: "a function-graph frame"
        }
      let who = thread == 0 ? "a thread" : "thread \(thread)"
      return "\(who) holds 0x\(String(value, radix: 16)) in \(at)"
    }
  }

  /// Which words of a thread's stack can reference a range.
  enum StackWords {
    /// Every word: code a thread may return or jump into (trampolines, stubs), whose addresses
    /// live frames hold as return addresses and saved values.
    case every
    /// Only the saved rip of a signal frame that may still be live (`SignalFrames`): for the
    /// inside of a prologue being relocated, where no return address points (a call among the
    /// moved instructions is always the last), so only a thread a signal interrupted there will
    /// come back to it. The conservative scan took stale words for holders: a snapshot signal's
    /// frame left where a later frame never wrote (an attach test abandoned a relocation over
    /// one found 0x15a8 bytes above a busy thread's rsp, about once in ten runs of the suite).
    case signalFrames
  }

  /// The indices of `ranges` some thread references, each with where it was first seen, or why
  /// a thread could not be inspected.
  static func busyRanges(
    _ ranges: [Range<UInt64>], callerStack: UInt64, stackWords: StackWords = .every
  ) -> Result<[Int: Holder], Obstacle> {
    var map = MemoryMap.current()
    var busy: [Int: Holder] = [:]
    var frames = SignalFrames()
    // CodeImage blocks never overlap (the arena hands each byte out once): sorted by start, the
    // only candidate for a value is the last block starting at or below it. Thousands of
    // retired graph stubs stay cheap to check.
    let order = ranges.indices.sorted { ranges[$0].lowerBound < ranges[$1].lowerBound }
    let starts = order.map { ranges[$0].lowerBound }
    let low = starts.first!
    let high = ranges.map(\.upperBound).max()!
    func check(_ value: UInt64, _ holder: @autoclosure () -> Holder) {
      guard value >= low && value < high else { return }
      var lower = 0
      var upper = starts.count
      while upper - lower > 1 {
        let middle = (lower + upper) / 2
        if starts[middle] <= value { lower = middle } else { upper = middle }
      }
      let index = order[lower]
      if ranges[index].contains(value) && busy[index] == nil { busy[index] = holder() }
    }
    func scanStack(of tid: Int32, from rsp: UInt64) -> Bool {
      guard let region = map.region(containing: rsp), region.readable else { return false }
      var at = rsp & ~7
      while at + 8 <= region.end {
        let value = UnsafePointer<UInt64>(bitPattern: UInt(at))!.pointee
        if value >= low && value < high && (stackWords == .every || frames.mayBeLive(savedRipAt: at, in: region)) {
          check(value, Holder(thread: tid, place: .stack(offset: at - rsp), value: value))
        }
        at += 8
      }
      return true
    }
    let me = ctracery_gettid()
    // This thread, from its caller's frames up: a handler, or a traced function, may be
    // detaching from inside a trampoline.
    guard scanStack(of: me, from: callerStack) else { return .failure(Obstacle(reason: "own stack not found")) }
    func scan(_ tid: Int32, rip: UInt64, rsp: UInt64, others: [UInt64]) -> Obstacle? {
      check(rip, Holder(thread: tid, place: .instructionPointer, value: rip))
      for value in others { check(value, Holder(thread: tid, place: .register, value: value)) }
      var scanned = scanStack(of: tid, from: rsp)
      if !scanned {
        // Its stack may be newer than a map `MemoryMap.fixed` pinned: read the map again.
        map = .fresh()
        scanned = scanStack(of: tid, from: rsp)
      }
      guard scanned else {
        return Obstacle(reason: "thread \(tid): rsp 0x\(String(rsp, radix: 16)) is in no readable mapping")
      }
      return nil
    }
    // Threads blocked in a system call first, then those seen running, looked at again a few
    // times before any is signalled (`runningLooks`).
    var running = threadIDs().filter { $0 != me }
    for look in 0..<runningLooks where !running.isEmpty {
      if look > 0 { usleep(200) }
      var still: [Int32] = []
      for tid in running {
        guard let blocked = blockedRegisters(of: tid) else {
          still.append(tid)
          continue
        }
        if let obstacle = scan(tid, rip: blocked.rip, rsp: blocked.rsp, others: []) { return .failure(obstacle) }
      }
      running = still
    }
    // Those that can be signalled before those polled for ~100 ms (they block the signal): a
    // thread that makes the pass fail (on its alternate stack) is found without the wait.
    let blocking = running.filter { blocksSnapshotSignal($0) }
    for tid in running.filter({ !blocking.contains($0) }) + blocking {
      guard let (rip, rsp, others, onAlternateStack) = registers(of: tid) else {
        // Exited meanwhile: nothing to scan. Otherwise we cannot tell: keep everything.
        if access("/proc/self/task/\(tid)", F_OK) != 0 { continue }
        return .failure(Obstacle(reason: "thread \(tid) did not answer the snapshot signal"))
      }
      if onAlternateStack {
        return .failure(Obstacle(reason: "thread \(tid) is running a signal handler on its alternate stack"))
      }
      if let obstacle = scan(tid, rip: rip, rsp: rsp, others: others) { return .failure(obstacle) }
    }
    guard scanShadowStacks({ check($0, Holder(thread: 0, place: .shadowStack, value: $0)) }) else {
      return .failure(Obstacle(reason: "more threads with a shadow stack than the registry holds"))
    }
    return .success(busy)
  }

  /// Signal frames as the kernel builds them on x86-64 (`struct rt_sigframe`): at F the address
  /// the handler returns to (a restorer of the process's signal actions; F + 8 is 16-byte
  /// aligned), then the ucontext (the interrupted rip at F + 176), then the siginfo (si_signo
  /// at F + 312). A word in such a frame's rip slot may be the frame of a handler still running.
  /// Except a snapshot signal's: its handler answers and returns, one request at a time, and the
  /// thread's rip it reported is checked (and moved) on its own; every such frame on a stack is
  /// a dead one. Other signals' frames count whether or not their handler still runs (a
  /// handler may unblock its own signal, so the mask cannot tell).
  struct SignalFrames {
    static let savedRip: UInt64 = 176
    static let signalNumber: UInt64 = 312
    /// Read on the first candidate (rare: most scans find no word in range at all).
    private var restorers: Set<UInt64>?

    mutating func mayBeLive(savedRipAt slot: UInt64, in region: MemoryMap.Region) -> Bool {
      guard slot % 16 == 8, slot >= region.start + Self.savedRip,
        slot - Self.savedRip + Self.signalNumber + 4 <= region.end
      else { return false }
      let frame = slot - Self.savedRip
      let signal = UnsafePointer<Int32>(bitPattern: UInt(frame + Self.signalNumber))!.pointee
      guard (1...64).contains(signal), signal != ctracery_snapshot_signal() else { return false }
      if restorers == nil {
        var found = [UInt64](repeating: 0, count: 64)
        let count = ctracery_signal_restorers(&found, Int32(found.count))
        restorers = Set(found.prefix(Int(count)))
      }
      return restorers!.contains(UnsafePointer<UInt64>(bitPattern: UInt(frame))!.pointee)
    }
  }

  /// The return-address slots of every live function-graph frame of every thread, and the real
  /// return addresses: a slot may lie on a stack no scan above reaches (a coroutine suspended
  /// inside a traced call, or the thread's own stack while a signal handler runs on an
  /// alternate one). Everything is read with `ctracery_read_memory`, which fails instead of
  /// faulting: a thread may exit, and a coroutine's stack be freed, meanwhile. False when some
  /// thread's frames cannot be found (the registry was full).
  static func scanShadowStacks(_ check: (UInt64) -> Void) -> Bool {
    var states = [UInt64](repeating: 0, count: 4096)
    let count = ctracery_shadow_threads(&states, states.count)
    guard count >= 0 else { return false }
    let size = UInt64(GraphEmitter.frameSize)
    for address in states.prefix(count) {
      var thread = ctracery_thread()
      let want = MemoryLayout<ctracery_thread>.size
      guard ctracery_read_memory(&thread, UnsafeRawPointer(bitPattern: UInt(address)), UInt(want)) == want,
        thread.shadow_base != 0, thread.shadow_top > thread.shadow_base + size,
        thread.shadow_top - thread.shadow_base <= thread.shadow_size
      else { continue }
      let frames = Int((thread.shadow_top - thread.shadow_base) / size) - 1
      var buffer = [tracery_graph_frame](repeating: tracery_graph_frame(), count: frames)
      let bytes = frames * Int(size)
      let read = buffer.withUnsafeMutableBytes { raw in
        ctracery_read_memory(
          raw.baseAddress, UnsafeRawPointer(bitPattern: UInt(thread.shadow_base + size)), UInt(bytes))
      }
      guard read == bytes else { continue }
      for frame in buffer {
        check(frame.return_address)
        var word: UInt64 = 0
        if ctracery_read_memory(&word, UnsafeRawPointer(bitPattern: UInt(frame.slot)), 8) == 8 { check(word) }
      }
    }
    return true
  }

  static func threadIDs() -> [Int32] {
    guard let directory = opendir("/proc/self/task") else { return [] }
    defer { closedir(directory) }
    var result: [Int32] = []
    while let entry = readdir(directory) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      if let tid = Int32(name) { result.append(tid) }
    }
    return result
  }

  /// rip, rsp and the other general-purpose registers of thread `tid`: rip and rsp from procfs
  /// while it is blocked in a system call (no generated code holds a pointer only in a register
  /// across one: none makes system calls), else all of them from a snapshot signal if the thread
  /// does not block that signal (a thread blocked outside a system call, e.g. on a page fault,
  /// answers once it runs again). A running thread that blocks the signal is polled for up to
  /// ~100 ms, until it blocks in a system call or answers from the SIGTRAP handler; then nil.
  /// `onAlternateStack`: the thread was running a signal handler on its alternate stack, so the
  /// stack it interrupted (which may hold returns into trampolines) is not the one rsp is on.
  static func registers(of tid: Int32) -> (rip: UInt64, rsp: UInt64, others: [UInt64], onAlternateStack: Bool)? {
    for _ in 0..<20 {
      // The mask first: the look at procfs and the signal follow each other as closely as they
      // can (see `runningLooks`).
      let signal = !blocksSnapshotSignal(tid)
      if let blocked = blockedRegisters(of: tid) { return (blocked.rip, blocked.rsp, [], false) }
      if let snapshot = snapshot(of: tid, signal: signal) { return snapshot }
    }
    return nil
  }

  /// The registers of running thread `tid` from a snapshot: by signal if it does not block the
  /// snapshot signal (20 ms to answer), else only if it is running the SIGTRAP handler, which
  /// blocks the signal for microseconds and answers as it ends (5 ms). (Read each time: a thread
  /// that traps at every call shows the signal blocked at nearly every look.)
  static func snapshot(
    of tid: Int32, signal: Bool? = nil
  ) -> (rip: UInt64, rsp: UInt64, others: [UInt64], onAlternateStack: Bool)? {
    let signal = signal ?? !blocksSnapshotSignal(tid)
    var rip: UInt64 = 0
    var rsp: UInt64 = 0
    var others = [UInt64](repeating: 0, count: Int(CTRACERY_SNAPSHOT_REGISTERS))
    let answer = ctracery_snapshot_thread(tid, &rip, &rsp, &others, signal ? 20 : 5, signal ? 1 : 0)
    return answer >= 0 ? (rip, rsp, others, answer == 1) : nil
  }

  /// rip and rsp of a thread blocked in a system call: "NR arg1 ... arg6 sp pc". nil for "-1 sp
  /// pc" (blocked outside a system call: its registers may matter, so it is signalled) and for
  /// "running".
  static func blockedRegisters(of tid: Int32) -> (rip: UInt64, rsp: UInt64)? {
    guard let text = System.readFile("/proc/self/task/\(tid)/syscall") else { return nil }
    let fields = String(decoding: text, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard let first = fields.first, first != "running", first != "-1", fields.count >= 3,
      let sp = UInt64(fields[fields.count - 2].dropFirst(2), radix: 16),
      let pc = UInt64(fields[fields.count - 1].dropFirst(2), radix: 16)
    else { return nil }
    return (pc, sp)
  }

  /// Whether thread `tid` blocks the snapshot signal (`SigBlk:` of its status). Such a thread is
  /// never signalled: a blocked real-time signal would stay queued against the process's limit.
  static func blocksSnapshotSignal(_ tid: Int32) -> Bool {
    guard let text = System.statusField("SigBlk", of: "/proc/self/task/\(tid)/status"),
      let mask = UInt64(text, radix: 16)
    else { return true }
    return mask & (1 << UInt64(ctracery_snapshot_signal() - 1)) != 0
  }

}

/// Runs `body` with the address of a stack slot in a frame of its own, above (at a higher
/// address than) every frame `body` creates. Tracer's public entry points call it before any
/// trampoline address exists in their call, so the reclaimer scans the calling thread from the
/// marker up and never sees its own bookkeeping.
@inline(never)
func withCallerStackMarker<T, E: Error>(_ body: (UInt64) throws(E) -> T) throws(E) -> T {
  var marker: UInt64 = 0
  return try withUnsafeMutablePointer(to: &marker) { pointer throws(E) in try body(UInt64(UInt(bitPattern: pointer))) }
}

/// An attachment's counters, read by `Link` and incremented by generated code: calls at +0,
/// calls skipped by the recursion guard at +8, time-stamp-counter ticks in the handler at +16.
/// Freed when the link and every trampoline that refers to it are gone.
final class AttachmentCounters: @unchecked Sendable {
  // @unchecked: generated code updates the words with `lock inc`; Swift only loads them.
  let pointer: UnsafeMutablePointer<UInt64>

  init() {
    pointer = .allocate(capacity: 3)
    pointer.initialize(repeating: 0, count: 3)
  }

  deinit { pointer.deallocate() }

  var address: UInt64 { UInt64(UInt(bitPattern: pointer)) }
  var calls: UInt64 { UnsafeAtomicLoad.relaxed(pointer) }
  var skipped: UInt64 { UnsafeAtomicLoad.relaxed(pointer + 1) }
  var ticks: UInt64 { UnsafeAtomicLoad.relaxed(pointer + 2) }
}
