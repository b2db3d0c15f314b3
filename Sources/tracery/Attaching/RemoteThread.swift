import CTraceryInject
import Foundation

/// One thread of a running process, held under ptrace for calls made in it (`record -p`).
///
/// Protocol: `PTRACE_SEIZE` then `PTRACE_INTERRUPT` (never `PTRACE_ATTACH`: no SIGSTOP the
/// program could see), its registers saved; each `call` runs a function on the thread's own
/// stack, well below its red zone, with a zero return address: the function's `ret` faults at 0,
/// which stops the thread again (that SIGSEGV is never delivered). With `orig_rax` = -1 during
/// the calls the kernel does not restart a system call the thread was in at our code; `detach`
/// puts every register back as it was, so an interrupted system call is restarted as if nothing
/// happened (the program sees no EINTR). Signals that arrive for the thread meanwhile are passed
/// on, not lost.
///
/// Memory is written through the thread's /proc/PID/task/TID/mem, which reaches read-only and
/// executable pages of a process we trace.
struct RemoteThread {
  /// The thread (the process's own id for its main thread).
  let tid: pid_t
  private let memory: Int32
  private let saved: user_regs_struct
  private var stopped = true

  /// Seizes and stops thread `tid` of process `process`. Throws with the reason when it cannot.
  init(process: pid_t, tid: pid_t) throws {
    self.tid = tid
    // (The thread's own view: a main thread that has exited has no memory to show.)
    let path = "/proc/\(process)/task/\(tid)/mem"
    memory = open(path, O_RDWR | O_CLOEXEC)
    guard memory >= 0 else { throw UserError("cannot open \(path): \(String(cString: strerror(errno)))") }
    guard ctracery_ptrace_seize(tid) == 0 else {
      let reason = String(cString: strerror(errno))
      close(memory)
      throw UserError("cannot trace thread \(tid) of process \(process) (ptrace: \(reason))")
    }
    do {
      guard ctracery_ptrace_interrupt(tid) == 0 else { throw UserError("cannot stop thread \(tid)") }
      try Self.waitForInterrupt(tid)
      var registers = user_regs_struct()
      guard ctracery_ptrace_getregs(tid, &registers) == 0 else { throw UserError("cannot read the registers") }
      saved = registers
    } catch {
      _ = ctracery_ptrace_detach(tid, 0)
      close(memory)
      throw error
    }
  }

  /// Waits for the interrupt's stop; signal-delivery stops on the way are passed on.
  private static func waitForInterrupt(_ tid: pid_t) throws {
    while true {
      let status = try waitStop(tid)
      let signal = (status >> 8) & 0xff
      if ctracery_ptrace_event(status) == ctracery_ptrace_event_stop() { return }
      guard ctracery_ptrace_cont(tid, signal) == 0 else { throw UserError("cannot resume thread \(tid)") }
    }
  }

  /// The next stop of `tid` (its wait status); throws when it ended instead.
  private static func waitStop(_ tid: pid_t) throws -> Int32 {
    var status: Int32 = 0
    while true {
      let result = waitpid(tid, &status, __WALL)
      if result == tid { break }
      guard result < 0, errno == EINTR else {
        throw UserError("waiting for thread \(tid): \(String(cString: strerror(errno)))")
      }
    }
    guard status & 0xff == 0x7f else { throw UserError("thread \(tid) ended while being attached to") }
    return status
  }

  /// Calls `function(arguments...)` (at most six integer arguments) in the thread; its rax.
  func call(_ function: UInt64, _ arguments: UInt64...) throws -> UInt64 {
    precondition(arguments.count <= 6)
    var registers = saved
    // Far below the red zone and whatever the interrupted code keeps under its stack pointer.
    var stack = (saved.rsp &- 1024) & ~15
    stack -= 8
    try write(withUnsafeBytes(of: UInt64(0)) { Array($0) }, at: stack)
    registers.rsp = stack
    registers.rip = function
    registers.rax = 0
    registers.orig_rax = UInt64.max
    let slots: [WritableKeyPath<user_regs_struct, UInt64>] = [\.rdi, \.rsi, \.rdx, \.rcx, \.r8, \.r9]
    for (slot, value) in zip(slots, arguments) { registers[keyPath: slot] = value }
    guard ctracery_ptrace_setregs(tid, &registers) == 0 else { throw UserError("cannot set the registers") }
    var signal: Int32 = 0
    while true {
      guard ctracery_ptrace_cont(tid, signal) == 0 else { throw UserError("cannot resume thread \(tid)") }
      let status = try Self.waitStop(tid)
      signal = (status >> 8) & 0xff
      guard ctracery_ptrace_event(status) == 0 else {
        signal = 0
        continue
      }
      if signal == SIGSEGV {
        var result = user_regs_struct()
        guard ctracery_ptrace_getregs(tid, &result) == 0 else { throw UserError("cannot read the registers") }
        guard result.rip == 0 else {
          throw UserError("a call in thread \(tid) faulted at 0x\(String(result.rip, radix: 16))")
        }
        return result.rax
      }
    }
  }

  /// A place for a word the calls may write (the thread's stack, between its red zone and the
  /// calls' frames).
  var scratchWord: UInt64 { (saved.rsp &- 512) & ~15 }

  func write(_ bytes: [UInt8], at address: UInt64) throws {
    let written = bytes.withUnsafeBytes { pwrite(memory, $0.baseAddress, $0.count, off_t(Int64(bitPattern: address))) }
    guard written == bytes.count else {
      throw UserError("cannot write the memory of thread \(tid) at 0x\(String(address, radix: 16))")
    }
  }

  func read(_ count: Int, at address: UInt64) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    let done = bytes.withUnsafeMutableBytes { pread(memory, $0.baseAddress, count, off_t(Int64(bitPattern: address))) }
    guard done == count else {
      throw UserError("cannot read the memory of thread \(tid) at 0x\(String(address, radix: 16))")
    }
    return bytes
  }

  /// Puts every register back and lets the thread go.
  mutating func detach() {
    guard stopped else { return }
    stopped = false
    var registers = saved
    _ = ctracery_ptrace_setregs(tid, &registers)
    _ = ctracery_ptrace_detach(tid, 0)
    close(memory)
  }
}
