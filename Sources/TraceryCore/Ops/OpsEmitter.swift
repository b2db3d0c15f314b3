import TraceryX86

/// Generates an ops entry (the kernel's ftrace ops callers, `ftrace_ops_list_func`): called from a patch site (`call`;
/// [rsp] = the body, right after the site: `PatchSite.bodyFollowsBranch`; [rsp+8] = the real
/// return), it saves the argument registers into a
/// `tracery_call` (the callback's register view), calls either one ops' callback directly (the
/// ops' own trampoline) or the shared dispatcher with the image's ops table (the shared caller,
/// the kernel's list function), then puts the view back:
///
///     arguments and rax, xmm0-7     restored from the view (a callback may change them)
///     return_address                written back into the caller's return slot
///     function                      if a callback changed it, the call goes there instead of the
///                                   traced function's body (the kernel's IPMODIFY)
///
/// `function` in the view is the patch site (the function's entry, or entry + 4 after
/// `endbr64`). The recursion guard (a thread-local byte) is held while callbacks run; a traced
/// call made with it held is not given to guarded ops.
struct OpsEmitter {
  enum Target: Equatable {
    case callback(UInt64, cookie: UInt64)
    case dispatcher(UInt64, table: UInt64)
  }

  let target: Target
  let guarded: Bool
  let guardOffset: Int32

  /// `tracery_call` (272 bytes) and 16 bytes of padding: rsp stays 16-byte aligned at the call
  /// (it is at the entry, below two return addresses).
  static let frame: Int32 = 288

  func emit(at base: UInt64) throws -> [UInt8] {
    var w = X86Writer(base: base)
    let done = w.newLabel()
    let keep = w.newLabel()
    let size = Self.frame
    if guarded {
      w.putCmpByte(.fs(guardOffset), immediate: 0)
      w.putJcc(.notEqual, done)
    }
    w.putSub(.rsp, immediate: size)
    TrampolineEmitter.putSaveArguments(&w, .unknown)
    w.putMov(.r10, Memory(.rsp, size))
    w.putSub(.r10, immediate: Int32(SiteBytes.length))  // the site's `call` returns after it
    TrampolineEmitter.putRegisterView(
      &w, function: .register(.r10), returnAddress: Memory(.rsp, size + 8), stackArguments: Memory(.rsp, size + 16),
      scratch: .r10)
    if guarded { w.putMovByte(.fs(guardOffset), immediate: 1) }
    switch target {
    case .callback(let callback, let cookie):
      w.putMov(.rdi, .rsp)
      w.putMov(.rsi, immediate: cookie)
      w.putCall(address: callback, orThrough: .rax)
    case .dispatcher(let dispatcher, let table):
      w.putMov(.rdi, immediate: table)
      w.putMov(.rsi, .rsp)
      w.putCall(address: dispatcher, orThrough: .rax)
    }
    if guarded { w.putMovByte(.fs(guardOffset), immediate: 0) }
    w.putMov(.r10, Memory(.rsp, 8))
    w.putMov(Memory(.rsp, size + 8), .r10)
    w.putMov(.r10, Memory(.rsp, size))
    w.putSub(.r10, immediate: Int32(SiteBytes.length))  // the site's `call` returns after it
    w.putCmp(.r10, Memory(.rsp, 0))
    w.putJcc(.equal, keep)
    w.putMov(.r10, Memory(.rsp, 0))
    w.putMov(Memory(.rsp, size), .r10)
    w.bind(keep)
    TrampolineEmitter.putRestoreArguments(&w, .unknown)
    w.putAdd(.rsp, immediate: size)
    w.bind(done)
    w.putRet()
    return try w.finish()
  }
}
