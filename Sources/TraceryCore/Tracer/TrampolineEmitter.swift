import Synchronization
import TraceryX86

/// One handler call a trampoline makes.
struct HandlerCall: Sendable, Equatable {
  /// The handler's entry address.
  let handler: UInt64
  let cookie: UInt64
  /// The attachment's counters (`AttachmentCounters`): calls at +0 (when counted), calls
  /// skipped by the recursion guard at +8, time-stamp-counter ticks spent in the handler at +16
  /// (when timed).
  let counters: UInt64
  let statistics: Statistics
}

/// What an attachment counts on each call.
public enum Statistics: Sendable, Equatable {
  /// Nothing (the default: no cost).
  case none
  /// Calls: one atomic increment per call.
  case calls
  /// Calls and the time spent in the handler: two `rdtsc` and two atomic adds per call.
  case callsAndTime
}

/// Generates the per-function trampoline (the kernel's BPF trampoline, `arch_prepare_bpf_trampoline`), entered by `jmp`
/// from the function's patch site:
///
///     site:  jmp tramp                      tramp:  push rbp; mov rbp, rsp; sub rsp, 272
///     site+5: <body of the function>                save the model's argument registers into
///                                                   the tracery_call at [rsp]
///                                                   if guard free: entry handlers, then
///                                                     modify-return handlers (non-zero: skip body)
///                                          entry-only: restore registers; leave; jmp site+5
///                                          otherwise:  copy stack arguments; restore registers;
///                                                      call site+5; save rax/rdx/xmm0/xmm1;
///                                                      if guard free: exit handlers;
///                                                      load the results; leave; ret
///
/// Frame (rbp = rsp at entry - 8; every handler call sees rsp 16-byte aligned):
///
///     rbp+16 ...  caller's stack arguments        rsp+272 = rbp
///     rbp+8       return address to the caller    rsp+0 ... rsp+271: tracery_call
///     rbp+0       saved rbp
///
/// The recursion guard is a per-thread byte at `fs:[guardOffset]`: set while this thread runs
/// handlers, so a handler that calls a traced function runs that function untraced (its
/// attachments' skipped counters say so). It is clear while the body runs.
///
/// Entry-only trampolines use a smaller shape without a frame pointer (`emitEntryOnly`). Either
/// way there is one epilogue; the out-of-line stubs for the guard paths follow it, which keeps
/// the unwind table to a few rows (`UnwindInfo`).
struct TrampolineEmitter {
  // The `tracery_call` the handlers get (tracery.h; LayoutTests checks each against it).
  static let frameSize: Int32 = 272
  static let functionOffset: Int32 = 0
  static let returnAddressOffset: Int32 = 8
  static let stackArgumentsOffset: Int32 = 16
  /// Tracery's own word (the multi-attach trampoline's "the body popped 8 bytes" flag).
  static let reservedOffset: Int32 = 24
  static let argumentsOffset: Int32 = 32
  static let raxOffset: Int32 = 80
  static let returnOffset: Int32 = 88
  static let floatArgumentsOffset: Int32 = 112
  static let floatReturnOffset: Int32 = 240

  /// Where the traced function's address comes from for `putRegisterView`.
  enum FunctionAddress {
    /// Already in this register.
    case register(Register)
    /// This address, within rel32 reach of the code (a rip-relative lea is 3 bytes shorter than
    /// a movabs).
    case nearby(UInt64)
  }

  /// Fills the first words of the `tracery_call` at rsp, the handlers' view of the call: the
  /// function, the return address, the caller's stack arguments. `scratch` is clobbered (it may
  /// be the register `function` is in: the function is stored first). One writer for every
  /// trampoline kind (per-function, ops, multi-attach).
  static func putRegisterView(
    _ w: inout X86Writer, function: FunctionAddress, returnAddress: Memory, stackArguments: Memory, scratch: Register
  ) {
    switch function {
    case .register(let register): w.putMov(Memory(.rsp, functionOffset), register)
    case .nearby(let address):
      w.putLea(scratch, .rip(address))
      w.putMov(Memory(.rsp, functionOffset), scratch)
    }
    w.putMov(scratch, returnAddress)
    w.putMov(Memory(.rsp, returnAddressOffset), scratch)
    w.putLea(scratch, stackArguments)
    w.putMov(Memory(.rsp, stackArgumentsOffset), scratch)
  }

  let patch: PatchSite
  let model: FunctionModel
  let entries: [HandlerCall]
  let modifyReturns: [HandlerCall]
  let exits: [HandlerCall]
  let guardOffset: Int32

  var function: UInt64 { patch.function }
  /// The body of the function: where it goes on without the bytes its site's branch replaced.
  var body: UInt64 { patch.resume }
  var callsOriginal: Bool { !exits.isEmpty || !modifyReturns.isEmpty }

  /// For functions built without patch sites (`PatchSite.keepsEveryRegister`): gcc's callers
  /// of such a function may keep values in call-clobbered registers it does not touch
  /// (`-fipa-ra`) and call it with rsp not 16-byte aligned (`-fipa-stack-alignment`). The
  /// trampoline then aligns its frame (a frame pointer, `and rsp, -16`) and keeps every
  /// call-clobbered register (rax, rcx, rdx, rsi, rdi, r8-r11, xmm0-15) around its handlers:
  /// the body sees the registers it was called with (but arguments handlers changed), the
  /// caller those the body returned with (but results handlers changed).
  var preservesAll: Bool { patch.keepsEveryRegister }

  /// Below the tracery_call in a frame that preserves every register: xmm0-15, then the
  /// integer registers `kept`.
  static let keptVectorsOffset: Int32 = frameSize
  static let keptIntegersOffset: Int32 = frameSize + 256
  static let kept: [Register] = [.rax, .rcx, .rdx, .rsi, .rdi, .r8, .r9, .r10, .r11]
  static let keepingFrameSize: Int32 = (keptIntegersOffset + 8 * Int32(kept.count) + 15) / 16 * 16

  /// The finished code, and the offsets `UnwindInfo` needs.
  struct Code {
    let bytes: [UInt8]
    let frame: UnwindInfo.Frame
  }

  /// Entry-only trampolines have no frame pointer: the body never runs inside their frame, so
  /// `sub rsp` / `add rsp` is all the frame they need (three instructions fewer per call).
  static let entryOnlyFrame: Int32 = frameSize + 8

  func emit(at base: UInt64) throws -> Code {
    precondition(!callsOriginal || model.stackArgumentWords != nil, "exit trampolines need known stack arguments")
    return callsOriginal ? try emitWithOriginal(at: base) : try emitEntryOnly(at: base)
  }

  /// `push rbp; mov rbp, rsp` (unwind rows 1 and 2 are at offsets 1 and 4), then the frame.
  /// Keeping every register, the frame is aligned here and the registers as called are kept
  /// below the tracery_call.
  private func putFramePointerPrologue(_ w: inout X86Writer) {
    w.putPush(.rbp)
    w.putMov(.rbp, .rsp)
    if preservesAll {
      w.putAnd(.rsp, immediate: -16)
      w.putSub(.rsp, immediate: Self.keepingFrameSize)
      Self.putKeepAll(&w, beyond: model)
    } else {
      w.putSub(.rsp, immediate: Self.frameSize)
    }
  }

  /// Saves every call-clobbered register below the tracery_call at rsp + `frame` (16-byte
  /// aligned), but those `model` says the tracery_call holds (`saveArguments`: the arguments,
  /// which are restored from there): passing `nil` keeps them all.
  static func putKeepAll(_ w: inout X86Writer, frame: Int32 = 0, beyond model: FunctionModel? = nil) {
    w.putEncoded(keepRun(KeepRun(frame: frame, model: model, restore: false)))
  }

  /// Loads back what `putKeepAll` saved.
  static func putRestoreAll(_ w: inout X86Writer, frame: Int32 = 0, beyond model: FunctionModel? = nil) {
    w.putEncoded(keepRun(KeepRun(frame: frame, model: model, restore: true)))
  }

  /// One run of keeping or restoring moves. Encoded once per shape: one trampoline per traced
  /// function emits four of them, twice (`placeCode`), and encoding them each time took an
  /// attach of 50,000 relocated functions from 310 to 430 ms.
  struct KeepRun: Hashable {
    let frame: Int32
    /// Bit i: `kept[i]` is moved.
    let integers: UInt16
    /// xmm registers from this one to 15 are moved.
    let firstVector: Int
    let restore: Bool

    init(frame: Int32, model: FunctionModel?, restore: Bool) {
      self.frame = frame
      self.restore = restore
      var integers = UInt16((1 << TrampolineEmitter.kept.count) - 1)
      firstVector = model?.floatArguments ?? 0
      if let model {
        for (index, register) in TrampolineEmitter.kept.enumerated()
        where Register.arguments.prefix(model.integerArguments).contains(register)
          || (model.isVariadic && register == .rax)
        {
          integers &= ~(1 << index)
        }
      }
      self.integers = integers
    }
  }

  private static let keepRuns = Mutex<[KeepRun: [UInt8]]>([:])

  private static func keepRun(_ run: KeepRun) -> [UInt8] {
    if let bytes = keepRuns.withLock({ $0[run] }) { return bytes }
    var w = X86Writer(base: 0)
    for index in run.firstVector..<16 {
      let slot = Memory(.rsp, run.frame + keptVectorsOffset + 16 * Int32(index))
      if run.restore {
        w.putMovaps(XMMRegister(UInt8(index)), slot)
      } else {
        w.putMovaps(slot, XMMRegister(UInt8(index)))
      }
    }
    for index in kept.indices where run.integers & (1 << index) != 0 {
      let slot = Memory(.rsp, run.frame + keptIntegersOffset + 8 * Int32(index))
      if run.restore {
        w.putMov(kept[index], slot)
      } else {
        w.putMov(slot, kept[index])
      }
    }
    let bytes = w.bytes
    keepRuns.withLock { $0[run] = bytes }
    return bytes
  }

  /// Entry handlers only: no frame pointer, and the trampoline ends by jumping into the body.
  ///
  ///     rsp+288 ...  caller's stack arguments
  ///     rsp+280      return address to the caller
  ///     rsp+0 ... rsp+271: tracery_call        (rsp 16-byte aligned)
  ///
  /// Keeping every register (`preservesAll`), the frame is `emitWithOriginal`'s (a frame
  /// pointer, aligned, the registers kept below the tracery_call).
  private func emitEntryOnly(at base: UInt64) throws -> Code {
    var w = X86Writer(base: base)
    let entryDone = w.newLabel()
    let skipEntry = w.newLabel()
    let frame = Self.entryOnlyFrame
    if preservesAll {
      putFramePointerPrologue(&w)
    } else {
      w.putSub(.rsp, immediate: frame)
    }
    let prologueEnd = w.bytes.count
    saveArguments(&w)
    if preservesAll {
      putCallHeader(&w, returnAddress: Memory(.rbp, 8), stackArguments: Memory(.rbp, 16))
    } else {
      putCallHeader(&w, returnAddress: Memory(.rsp, frame), stackArguments: Memory(.rsp, frame + 8))
    }
    try putGuarded(&w, skip: skipEntry) { w in
      for call in entries { try putHandlerCall(&w, call) }
    }
    w.bind(entryDone)
    if preservesAll { Self.putRestoreAll(&w, beyond: model) }
    restoreArguments(&w, frame: 0)
    let release = w.bytes.count
    if preservesAll {
      w.putLeave()
    } else {
      w.putAdd(.rsp, immediate: frame)
    }
    let afterRelease = w.bytes.count
    try w.putJmp(address: body)
    let epilogueEnd = w.bytes.count
    w.bind(skipEntry)
    for call in entries { putSkipCount(&w, call) }
    w.putJmp(entryDone)
    w.putUd2()
    let unwind: UnwindInfo.Frame =
      preservesAll
      ? .framePointer(epilogueStart: release, epilogueEnd: epilogueEnd)
      : .stackPointer(size: Int(frame), prologueEnd: prologueEnd, afterRelease: afterRelease, epilogueEnd: epilogueEnd)
    return Code(bytes: try w.finish(), frame: unwind)
  }

  /// Exit or modify-return handlers: a frame-pointer frame around a call of the body.
  private func emitWithOriginal(at base: UInt64) throws -> Code {
    var w = X86Writer(base: base)
    let guardByte = Memory.fs(guardOffset)
    let entryDone = w.newLabel()
    let skipEntry = w.newLabel()
    let skipBody = w.newLabel()
    let afterBody = w.newLabel()
    let exitDone = w.newLabel()
    let skipExit = w.newLabel()
    let popped = w.newLabel()

    putFramePointerPrologue(&w)
    saveArguments(&w)
    putCallHeader(&w, returnAddress: Memory(.rbp, 8), stackArguments: Memory(.rbp, 16))
    if !modifyReturns.isEmpty {
      // A modify-return handler that skips the body without setting a result returns 0.
      w.putMov(Memory(.rsp, Self.returnOffset), immediate: 0)
      w.putMov(Memory(.rsp, Self.returnOffset + 8), immediate: 0)
      w.putMov(Memory(.rsp, Self.floatReturnOffset), immediate: 0)
      w.putMov(Memory(.rsp, Self.floatReturnOffset + 16), immediate: 0)
    }

    // Entry and modify-return handlers, under the guard.
    if !entries.isEmpty || !modifyReturns.isEmpty {
      try putGuarded(&w, skip: skipEntry) { w in
        for call in entries { try putHandlerCall(&w, call) }
        for call in modifyReturns {
          try putHandlerCall(&w, call)
          w.putTest32(.rax, .rax)
          w.putJcc(.notEqual, skipBody)  // skipBody clears the guard
        }
      }
    }
    w.bind(entryDone)

    let epilogueStart: Int
    do {
      let stackWords = model.stackArgumentWords ?? 0
      let stackBytes = Int32((stackWords * 8 + 15) / 16 * 16)
      if stackBytes > 0 {
        w.putSub(.rsp, immediate: stackBytes)
        for word in 0..<Int32(stackWords) {
          w.putMov(.r11, Memory(.rbp, 16 + 8 * word))
          w.putMov(Memory(.rsp, 8 * word), .r11)
        }
      }
      // The body gets the registers as called (but the arguments as the handlers left them);
      // the caller gets them as the body returned (a skipped body: as called).
      if preservesAll { Self.putRestoreAll(&w, frame: stackBytes, beyond: model) }
      restoreArguments(&w, frame: stackBytes)
      try w.putCall(address: body)
      if stackBytes > 0 { w.putAdd(.rsp, immediate: stackBytes) }
      putJumpIfBodyPopped(&w, to: popped)
      epilogueStart = try putAfterBody(&w, afterBody: afterBody, skipExit: skipExit, exitDone: exitDone, popping: 0)
    }
    let epilogueEnd = w.bytes.count

    // Out-of-line stubs (still inside the frame: the unwind table restores the frame rows here).
    w.bind(skipEntry)
    for call in entries + modifyReturns { putSkipCount(&w, call) }
    w.putJmp(entryDone)
    if !modifyReturns.isEmpty {
      w.bind(skipBody)
      w.putMovByte(guardByte, immediate: 0)
      if preservesAll {
        // The caller gets the registers as called (the arguments as the handlers left them):
        // what the return path restores, all of it, is written as the body's return would.
        Self.putRestoreAll(&w, beyond: model)
        restoreArguments(&w, frame: 0)
        Self.putKeepAll(&w)
      }
      w.putJmp(afterBody)
    }
    if !exits.isEmpty {
      w.bind(skipExit)
      for call in exits { putSkipCount(&w, call) }
      w.putJmp(exitDone)
    }
    // The body returned with `ret 8`: back to the tracery_call, and the same way out, but for
    // the `ret 8` (the unwind table takes this copy's `leave` for the frame's: one instruction).
    w.bind(popped)
    w.putSub(.rsp, immediate: 8)
    let skipPoppedExit = w.newLabel()
    let poppedExitDone = w.newLabel()
    _ = try putAfterBody(&w, afterBody: nil, skipExit: skipPoppedExit, exitDone: poppedExitDone, popping: 8)
    if !exits.isEmpty {
      w.bind(skipPoppedExit)
      for call in exits { putSkipCount(&w, call) }
      w.putJmp(poppedExitDone)
    }
    w.putUd2()
    return Code(bytes: try w.finish(), frame: .framePointer(epilogueStart: epilogueStart, epilogueEnd: epilogueEnd))
  }

  /// Right after the body's call: jumps to `label` when the body returned with `ret 8`, popping
  /// 8 bytes above its return address as well (Swift's async functions do: `swiftasynccc`, whose
  /// callers take 8 off rsp after the call; the word is the caller's, and not written). rsp is
  /// then 8 above the tracery_call. Exact either way: with every register kept, rsp was 16-byte
  /// aligned at the call (`and rsp, -16`), so a popped return leaves it at 8 mod 16; otherwise
  /// the frame has a fixed size below rbp (rbp is the body's to preserve). Flags only change.
  private func putJumpIfBodyPopped(_ w: inout X86Writer, to label: Label) {
    if preservesAll {
      w.putTest(.rsp, immediate: 8)
    } else {
      // lea leaves the flags as the compare set them.
      w.putLea(.rbp, Memory(.rbp, -Self.frameSize))
      w.putCmp(.rbp, .rsp)
      w.putLea(.rbp, Memory(.rbp, Self.frameSize))
    }
    w.putJcc(.notEqual, label)
  }

  /// After the body returned (rsp at the tracery_call): its results into the view, the exit
  /// handlers, the results back, and the return to the caller, popping `popping` bytes above the
  /// return address as the body did. `afterBody` (where a skipped body joins) is bound before the
  /// exit handlers when given. Returns where the epilogue (`leave`) starts.
  private func putAfterBody(
    _ w: inout X86Writer, afterBody: Label?, skipExit: Label, exitDone: Label, popping: UInt16
  ) throws -> Int {
    if preservesAll { Self.putKeepAll(&w) }
    saveReturn(&w)
    if let afterBody { w.bind(afterBody) }
    if !exits.isEmpty {
      try putGuarded(&w, skip: skipExit) { w in
        for call in exits { try putHandlerCall(&w, call) }
      }
    }
    w.bind(exitDone)
    if preservesAll { Self.putRestoreAll(&w) }
    loadReturn(&w)
    let epilogueStart = w.bytes.count
    w.putLeave()
    if popping > 0 { w.putRet(popping: popping) } else { w.putRet() }
    return epilogueStart
  }

  /// The register view for this function (allocated near its site: within rel32 reach).
  private func putCallHeader(_ w: inout X86Writer, returnAddress: Memory, stackArguments: Memory) {
    Self.putRegisterView(
      &w, function: .nearby(function), returnAddress: returnAddress, stackArguments: stackArguments, scratch: .r11)
  }

  /// `body` under this thread's recursion guard: if the guard is already set (we are inside a
  /// handler) jump to `skip`; otherwise set it, run `body`, clear it.
  private func putGuarded(
    _ w: inout X86Writer, skip: Label, _ body: (inout X86Writer) throws -> Void
  ) throws {
    let guardByte = Memory.fs(guardOffset)
    w.putCmpByte(guardByte, immediate: 0)
    w.putJcc(.notEqual, skip)
    w.putMovByte(guardByte, immediate: 1)
    try body(&w)
    w.putMovByte(guardByte, immediate: 0)
  }

  private func saveArguments(_ w: inout X86Writer) { Self.putSaveArguments(&w, model) }
  private func restoreArguments(_ w: inout X86Writer, frame: Int32) {
    Self.putRestoreArguments(&w, model, frame: frame)
  }
  private func saveReturn(_ w: inout X86Writer) { Self.putSaveReturn(&w, model) }
  private func loadReturn(_ w: inout X86Writer) { Self.putLoadReturn(&w, model) }

  /// Saves the argument registers `model` uses into the tracery_call at `base`.
  static func putSaveArguments(_ w: inout X86Writer, _ model: FunctionModel, base: Register = .rsp) {
    for (index, register) in Register.arguments.prefix(model.integerArguments).enumerated() {
      w.putMov(Memory(base, argumentsOffset + 8 * Int32(index)), register)
    }
    if model.isVariadic { w.putMov(Memory(base, raxOffset), .rax) }
    for index in 0..<model.floatArguments {
      w.putMovaps(Memory(base, floatArgumentsOffset + 16 * Int32(index)), XMMRegister(UInt8(index)))
    }
  }

  /// Reloads the argument registers from the tracery_call at `base` + `frame` (handlers may have
  /// changed them); `frame` is how far rsp has moved below it.
  static func putRestoreArguments(_ w: inout X86Writer, _ model: FunctionModel, frame: Int32 = 0, base: Register = .rsp)
  {
    for (index, register) in Register.arguments.prefix(model.integerArguments).enumerated() {
      w.putMov(register, Memory(base, frame + argumentsOffset + 8 * Int32(index)))
    }
    if model.isVariadic { w.putMov(.rax, Memory(base, frame + raxOffset)) }
    for index in 0..<model.floatArguments {
      w.putMovaps(XMMRegister(UInt8(index)), Memory(base, frame + floatArgumentsOffset + 16 * Int32(index)))
    }
  }

  /// Saves the result registers `model` returns in into the tracery_call at `base`.
  static func putSaveReturn(_ w: inout X86Writer, _ model: FunctionModel, base: Register = .rsp) {
    if model.returnsIntegers { w.putMov(Memory(base, returnOffset), .rax) }
    if model.returnsPair { w.putMov(Memory(base, returnOffset + 8), .rdx) }
    if model.returnsFloats { w.putMovaps(Memory(base, floatReturnOffset), XMMRegister(0)) }
    if model.returnsFloatPair { w.putMovaps(Memory(base, floatReturnOffset + 16), XMMRegister(1)) }
  }

  /// Loads the result registers back from the tracery_call at `base`.
  static func putLoadReturn(_ w: inout X86Writer, _ model: FunctionModel, base: Register = .rsp) {
    if model.returnsIntegers { w.putMov(.rax, Memory(base, returnOffset)) }
    if model.returnsPair { w.putMov(.rdx, Memory(base, returnOffset + 8)) }
    if model.returnsFloats { w.putMovaps(XMMRegister(0), Memory(base, floatReturnOffset)) }
    if model.returnsFloatPair { w.putMovaps(XMMRegister(1), Memory(base, floatReturnOffset + 16)) }
  }

  /// The frame's padding word holds the start time of a timed handler call.
  static let timerOffset: Int32 = 104

  /// Calls one handler. rax, rdx, r10 and r11 are free here: arguments and results live in the
  /// frame and are reloaded afterwards. A handler's `int` result stays in eax (moved through r10
  /// around the timing).
  private func putHandlerCall(_ w: inout X86Writer, _ call: HandlerCall) throws {
    if call.statistics != .none {
      w.putMov(.r11, immediate: call.counters)
      w.putInc(Memory(.r11), locked: true)
    }
    if call.statistics == .callsAndTime {
      putTimestamp(&w)
      w.putMov(Memory(.rsp, Self.timerOffset), .rax)
    }
    w.putMov(.rdi, .rsp)
    w.putMov(.rsi, immediate: call.cookie)
    w.putCall(address: call.handler, orThrough: .r11)
    if call.statistics == .callsAndTime {
      w.putMov(.r10, .rax)
      putTimestamp(&w)
      w.putSub(.rax, Memory(.rsp, Self.timerOffset))
      w.putMov(.r11, immediate: call.counters + 16)
      w.putAdd(Memory(.r11), .rax, locked: true)
      w.putMov(.rax, .r10)
    }
  }

  /// rax = the time-stamp counter (clobbers rdx).
  private func putTimestamp(_ w: inout X86Writer) {
    w.putRdtsc()
    w.putShl(.rdx, immediate: 32)
    w.putOr(.rax, .rdx)
  }

  private func putSkipCount(_ w: inout X86Writer, _ call: HandlerCall) {
    w.putMov(.r11, immediate: call.counters + 8)
    w.putInc(Memory(.r11), locked: true)
  }
}
