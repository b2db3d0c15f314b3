import CTracery
import CTraceryShims
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// One graph user as a graph image sees it (see `GraphEmitter`).
struct GraphUserCode: Equatable {
  enum Kind: Equatable {
    /// C or Swift handlers; the entry handler's non-zero result asks for the exit call.
    case handlers(entry: UInt64?, exit: UInt64?, cookie: UInt64)
    /// The built-in event recorder: events (`putRecord`) written inline into the thread's event
    /// buffer; `refill` (a C function without arguments) is called when the buffer is full.
    case recorder(refill: UInt64)
  }

  let index: Int
  let kind: Kind
  /// First word of the frame's `data` this user reserved.
  let dataOffset: Int
  /// Calls at this depth or deeper are not given to this user.
  let depthLimit: Int?
  /// Whether its handlers may use vector registers (xmm0-7 are then saved around them).
  let vectorRegisters: Bool
  /// The user's slot generation word and its value when the image was made: an exit is given
  /// only while they are equal, so a user that left (or a new one in its slot) is never called
  /// for a frame pushed before.
  let generationAddress: UInt64
  let generation: UInt64

  /// Whether any call's exit may be given to this user.
  var takesExits: Bool {
    switch kind {
    case .handlers(_, let exit, _): exit != nil
    case .recorder: true
    }
  }
}

/// Offsets of `struct ctracery_thread` fields (CTraceryShims.h), added to the thread's TLS offset.
enum ThreadField: Int32, CaseIterable {
  case top = 0
  case limit = 8
  case cursor = 16
  case end = 24
  case dropped = 32
  case overflowed = 40
  case stackLow = 72
  case stackHigh = 80
  case mark = 88
  case foreignCalls = 96
}

/// Generates the two routines of one function-graph image (the kernel's fgraph entry and
/// return_to_handler), for one fixed set of graph users (a "mask") and one set of registers to
/// preserve (a function model). Every function wanted by exactly that set of users, with that
/// model, reaches the image's entry; other functions reach other images. So the entry needs no
/// look-up: which users run, and what they need saved, is in its code.
///
/// A traced site jumps (`jmp`, not `call`) to a 32-byte stub of its own (`stub(at:)`), which
/// calls the entry, then the function's body, then jumps to the return handler:
///
///     stub:      call entry            ; returns with ZF set: traced (the real return address
///                jne  untraced         ; is on the shadow stack now, and `ret 8` took it off
///                                      ; the machine stack)
///                call body             ; PatchSite.resume, or the function's per-function trampoline;
///                jmp  return_handler   ; it sees its stack arguments where they were
///     untraced:  jmp  body             ; the stack is as the caller left it
///                .quad site            ; at stub + 24, read by the entry
///
/// Every `call` is paired with its `ret`, so the return-stack predictor stays right: the
/// return handler's final `ret` goes to the real caller, which is what the caller's own `call`
/// pushed on the predictor. (Swapping the return address in place, as the kernel does,
/// mispredicts every traced return: built in C on the benchmark's generated program, the swap
/// cost +13-15 ns a call where the stub's four taken branches cost +1-3 with 16 functions, and
/// +15-16 against +18-20 with 2,000, whose branches no longer fit the branch target buffer:
/// BENCHMARKS.md, session 19.)
///
/// A shadow frame is `tracery_graph_frame` (336 bytes), which begins with the layout of a
/// `tracery_call`: the handlers' `call` is the frame itself. The entry saves the argument
/// registers straight into it and the return handler the results, so nothing is copied for the
/// handlers (each store counts here: six fewer per call were 1.9 ns of 11.3).
///
/// Entry (`call` from the stub: [rsp] = stub + 5, [rsp+8] = the real return, rsp 16-aligned):
///
///     if this thread is inside a handler (guard byte): untraced
///     frame = shadow top (set up the thread's shadow stack on first use; full: count, untraced)
///     drop the frames that ended without a return (the stale-frame rule, in `emitEntry`)
///     fill the frame, publish top = frame + 1, re-fill if a signal handler's call overwrote it
///     run each user's entry (handlers with the model's registers saved in the frame, the
///     frame pointer kept in rbx; the recorder inline)
///     if some user wants the exit: traced (ZF set); else unpublish the frame, untraced (ZF clear)
///
/// Return handler, reached from the stub after the body returned to it (rsp = the frame's
/// `stack_arguments`, results in rax/rdx/xmm0/xmm1):
///
///     find the topmost frame whose stack arguments are rsp (when others lie above it, move it
///     above them: `putRotate`), push the real return address back into the slot, run each
///     user's exit whose bit the frame has, pop, `ret`.
///
/// While the body runs, its return-address slot holds an address in the stub: an unwinder or
/// `backtrace()` stops there unless `Tracer.restoreReturnAddresses()` ran first.
///
/// Tail calls: at -O2 `return f(x);` becomes `jmp f`, so a traced function may enter another
/// with its own return-address slot, which then holds its stub's resume point (where its body
/// returns). Both frames stay, with the same stack arguments; the callee's return goes to the
/// caller's stub, whose return handler then finds the caller's frame: two exits, in order, with
/// the callee's results (the stale-frame rule in `emitEntry` says how the entry tells this from
/// a stale frame).
///
/// Registers: an image for functions with a compiler's patch site changes only registers a call
/// may change and the function does not read (r10, r11; rcx, rsi, rdi, r8, r9 after it returned).
/// A function without one (a relocated prologue, an int3 site: `preservesAll`) may have callers
/// built with gcc's `-fipa-ra` (on at -O2; gcc turns it off only for functions with patch
/// sites), which keep values in any register the callee is known not to touch: its image gives
/// back every register but rsp and the flags, at the entry and at the return (r10 and r11 pushed
/// first; around handlers every call-clobbered register, xmm8-15 included when they may use
/// vector registers), and it aligns rsp itself before calling anything (`putAlignStack`: such a
/// function may be called with rsp unaligned). Around the recorder's refill and a thread's set-up,
/// which run Swift and libc code, every image keeps the whole vector state (`xsave`: the upper
/// halves of ymm/zmm arguments and results too; `putSlowCallSavingState`). Handlers' own calls
/// save xmm registers only: a handler that uses AVX may clear the upper halves of a function's
/// 256/512-bit arguments.
///
/// Below the first frame lies a sentinel frame whose stack arguments are the highest address and
/// whose depth is -1, so both searches end there.
///
/// Signals: a handler may interrupt anywhere and run traced functions. Frames are published
/// (top moved) before users see them and popped only after the exits ran, so a signal handler
/// pushes above them; only a frame not yet published can be overwritten, which the entry checks.
struct GraphEmitter {
  static let frameSize: Int32 = 336
  static let siteOffset: Int32 = 0
  static let returnOffset: Int32 = 8
  static let stackArgumentsOffset: Int32 = 16
  static let depthOffset: Int32 = 24
  static let takenOffset: Int32 = 104
  static let dataOffset: Int32 = 272
  static let dataWords = 7
  static let resumeOffset: Int32 = 328

  /// The recorder's events keep the depth modulo 2^14 (`tracery.h`'s event word, see `putRecord`).
  static let depthMask = Int32(TRACERY_EVENT_DEPTH_MASK)

  let users: [GraphUserCode]
  /// What the functions reaching this image pass and return in registers.
  let functionModel: FunctionModel
  /// Every register but rsp and the flags comes back as it was (see the type's comment).
  let preservesAll: Bool
  let guardOffset: Int32
  let threadOffset: Int32
  /// `void setup(void)`: sets up this thread's shadow stack.
  let setupThread: UInt64
  /// The address of the word holding the known-code table (`KnownCode`): calls from elsewhere
  /// are not traced. 0: every call is, and the entry does not look.
  var knownCode: UInt64 = 0
  /// Known code the entry checks first, with immediates (the program's text): a call from it
  /// looks at no table. Empty: the table only.
  var knownFast: Range<UInt64> = 0..<0

  var hasHandlers: Bool { users.contains { if case .handlers = $0.kind { true } else { false } } }

  /// What the handlers' frames save: the function model's registers, without the vector ones
  /// when no user's handlers touch vector registers.
  var model: FunctionModel {
    let model = preservesAll ? FunctionModel.unknown : functionModel
    return usesVectorRegisters ? model : model.withoutVectorRegisters
  }

  private var usesVectorRegisters: Bool { users.contains(where: \.vectorRegisters) }

  /// Bytes the entry pushes first (r10, r11) when it preserves every register.
  private var entryPushes: Int32 { preservesAll ? 16 : 0 }

  struct Code {
    let bytes: [UInt8]
    /// Offset of the return handler.
    let returnHandler: Int
  }

  /// Size of a function's stub, where in it the site address is kept, and where its call of
  /// the body returns (the frame's `resume`).
  static let stubSize = 32
  static let stubSiteOffset: Int32 = 24
  static let stubResumeOffset: Int32 = 12

  /// The stub of the function whose patch site is `site` (see the type's comment), placed at
  /// `base`; it calls `body` (`PatchSite.resume`, or the function's per-function trampoline, which then
  /// runs its handlers around the body). nil when a target is out of rel32 reach.
  static func stub(at base: UInt64, site: UInt64, body: UInt64, entry: UInt64, returnHandler: UInt64) -> [UInt8]? {
    var bytes = [UInt8](repeating: 0, count: stubSize)
    let written = bytes.withUnsafeMutableBytes { buffer in
      writeStub(
        into: buffer.baseAddress!, at: base, site: site, body: body, entry: entry, returnHandler: returnHandler)
    }
    return written ? bytes : nil
  }

  /// `stub(at:...)`'s `stubSize` bytes, stored at `destination` (a first attach writes its stubs
  /// so, in place in their block); false, with nothing stored, when a target is out of reach.
  static func writeStub(
    into destination: UnsafeMutableRawPointer, at base: UInt64, site: UInt64, body: UInt64, entry: UInt64,
    returnHandler: UInt64
  ) -> Bool {
    // Written byte by byte, not through X86Writer: one stub per traced function, and the
    // writer's labels and buffers were half of a 2,200-function attach's stub time.
    //     +0  call entry        +5  jne +10 (to +17)   +7  call body
    //     +12 jmp returnHandler +17 jmp body           +22 int3 int3   +24 site
    func relative(_ target: UInt64, from end: Int) -> Int32? {
      Int32(exactly: Int64(bitPattern: target &- (base &+ UInt64(end))))
    }
    let resume = Int(stubResumeOffset)
    guard let toEntry = relative(entry, from: 5), let toBody = relative(body, from: resume),
      let toReturn = relative(returnHandler, from: resume + 5), let toBodyUntraced = relative(body, from: 22)
    else { return false }
    func put(_ opcode: UInt8, _ displacement: Int32, at offset: Int) {
      destination.storeBytes(of: opcode, toByteOffset: offset, as: UInt8.self)
      destination.storeBytes(of: displacement.littleEndian, toByteOffset: offset + 1, as: Int32.self)
    }
    put(0xe8, toEntry, at: 0)
    destination.storeBytes(of: 0x0a75, toByteOffset: 5, as: UInt16.self)  // jne +10
    put(0xe8, toBody, at: resume - 5)
    put(0xe9, toReturn, at: resume)
    put(0xe9, toBodyUntraced, at: resume + 5)
    destination.storeBytes(of: 0xcccc, toByteOffset: 22, as: UInt16.self)
    destination.storeBytes(of: site.littleEndian, toByteOffset: Int(stubSiteOffset), as: UInt64.self)
    return true
  }

  func field(_ field: ThreadField) -> Memory { .fs(threadOffset + field.rawValue) }

  func emit(at base: UInt64) throws -> Code {
    var w = X86Writer(base: base)
    var cold: [(inout X86Writer) throws -> Void] = []
    try emitEntry(&w, cold: &cold)
    w.putNop(count: (16 - w.bytes.count % 16) % 16)
    let returnOffset = w.bytes.count
    try emitReturn(&w, cold: &cold)
    for stub in cold { try stub(&w) }
    w.putUd2()
    return Code(bytes: try w.finish(), returnHandler: returnOffset)
  }

  // MARK: - Entry

  /// Goes to `unknown` unless the caller's return address lies in known code: `knownFast`,
  /// compared inline (one load from the stack, a subtraction and a compare), else a range of the
  /// known-code table (`KnownCode`, never empty), scanned out of line; no table yet: known.
  /// Unknown callers are counted in the thread's `foreign_calls`. Uses r10 and r11 (free here)
  /// and the flags.
  private func putKnownCaller(
    _ w: inout X86Writer, returnAddress: Memory, unknown: Label, cold: inout [(inout X86Writer) throws -> Void]
  ) {
    let known = w.newLabel()
    let table = w.newLabel()
    if let size = Int32(exactly: knownFast.count), size > 0 {
      w.putMov(.r10, returnAddress)
      w.putMov(.r11, immediate: knownFast.lowerBound)
      w.putSub(.r10, .r11)
      w.putCmp(.r10, immediate: size)
      w.putJcc(.aboveOrEqual, table)
    } else {
      w.putJmp(table)
    }
    cold.append { [knownCode, self] w in
      let scan = w.newLabel()
      let next = w.newLabel()
      w.bind(table)
      w.putMov(.r11, immediate: knownCode)
      w.putMov(.r11, Memory(.r11, 0))
      w.putTest(.r11, .r11)
      w.putJcc(.equal, known)
      w.putMov(.r10, returnAddress)
      w.bind(scan)
      w.putCmp(.r10, Memory(.r11, 0))
      w.putJcc(.below, next)
      w.putCmp(.r10, Memory(.r11, 8))
      w.putJcc(.below, known)
      w.bind(next)
      w.putAdd(.r11, immediate: 16)
      w.putCmp(Memory(.r11, 8), immediate: 0)
      w.putJcc(.notEqual, scan)
      // Counted, so that readers can say how many calls were left untraced this way.
      w.putInc(self.field(.foreignCalls))
      w.putJmp(unknown)
    }
    w.bind(known)
  }

  private func emitEntry(
    _ w: inout X86Writer, cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    let frame = Self.frameSize
    let done = w.newLabel()
    let retry = w.newLabel()
    let slow = w.newLabel()
    let popStale = w.newLabel()
    let push = w.newLabel()
    let unpublish = w.newLabel()
    // rsp + pushes: the stub's return address; + 8 the real one; + 16 the stack arguments.
    let pushes = entryPushes

    if preservesAll {
      w.putPush(.r10)
      w.putPush(.r11)
    }
    w.putCmpByte(.fs(guardOffset), immediate: 0)
    w.putJcc(.notEqual, done)
    if knownCode != 0 {
      putKnownCaller(&w, returnAddress: Memory(.rsp, pushes + 8), unknown: done, cold: &cold)
    }
    w.bind(retry)
    w.putMov(.r11, field(.top))
    w.putCmp(.r11, field(.limit))
    w.putJcc(.aboveOrEqual, slow)
    // A live caller's stack arguments are above ours (rsp + 16); when not, the stale-frame rule below.
    w.putLea(.r10, Memory(.rsp, pushes + 16))
    w.putCmp(.r10, Memory(.r11, Self.stackArgumentsOffset - frame))
    w.putJcc(.aboveOrEqual, popStale)
    w.bind(push)
    putFillFrame(&w)
    w.putLea(.r10, Memory(.r11, frame))
    w.putMov(field(.top), .r10)
    // A signal between filling and publishing may have pushed (and popped) its own frame here.
    w.putLea(.r10, Memory(.rsp, pushes + 16))
    w.putCmp(.r10, Memory(.r11, Self.stackArgumentsOffset))
    w.putJcc(.notEqual, push)

    // One user that may take exits: no `taken` word; a call it declines leaves through
    // `declined`, a copy of the epilogue out of line, so the traced path has no test.
    let declined = decidesAtEntry ? w.newLabel() : nil
    if hasHandlers {
      try putEntryWithHandlers(&w, declined: declined, cold: &cold)
    } else {
      w.putPush(.rax)
      w.putPush(.rdx)
      for user in users { try putUserEntry(&w, user, withHandlers: false, declined: declined, cold: &cold) }
      w.putPop(.rdx)
      w.putPop(.rax)
    }
    if let declined {
      putLeaveEntry(&w, traced: true)
      cold.append { [self] w in
        w.bind(declined)
        if self.hasHandlers {
          self.putHandlersEpilogue(&w)
        } else {
          w.putPop(.rdx)
          w.putPop(.rax)
        }
        w.putJmp(unpublish)
      }
    } else {
      w.putCmp(Memory(.r11, Self.takenOffset), immediate: 0)
      w.putJcc(.equal, unpublish)
      putLeaveEntry(&w, traced: true)
    }
    w.bind(unpublish)
    w.putMov(field(.top), .r11)
    w.bind(done)
    putLeaveEntry(&w, traced: false)

    // Not set up (limit 0, top 0): set up and retry. Disabled (top 1, limit 0): return. Full:
    // count it and return.
    let overflow = w.newLabel()
    // The stale-frame rule: an entry drops the frames whose calls ended without their return
    // running. It looks at the top frame while its stack arguments are at or below ours (`A`:
    // rsp + 16 at the entry; a live caller's are above) and stops at the first frame it keeps:
    //
    //     case                                           top frame's stack arguments   frame
    //     ---------------------------------------------  ----------------------------  -------
    //     we run on another stack (alternate signal      any                           kept
    //       stack, a coroutine's): addresses compare
    //       nothing
    //     the frame lies on another stack (a suspended   below the thread's stack      kept
    //       coroutine's call)
    //     tail call: the frame's body jumped to us (or   = A, and our return address   kept
    //       to untraced code that jumped to us)            is the frame's `resume`
    //     a tail call that moved the return address up   < A, and our return address   kept
    //       (Swift's tail calls to a callee with fewer     is the frame's `resume`
    //       stack arguments copy it up and jump)
    //     longjmp / siglongjmp / an exception left it,   = A, another return address   dropped
    //       and the same caller calls again
    //     longjmp / siglongjmp / an exception unwound    < A, another return address   dropped
    //       past it
    //     a live caller (the ordinary case, no test)     > A                           kept
    //
    // A tail-called frame whose stack arguments differ from its tail caller's (the return address
    // moved, either way) hands its own to the caller's frame when it returns into the caller's
    // stub (`putReturnFound`), so the caller's return finds its frame there.
    //
    // A caught exception drops the unwound frames itself (`GraphThreads.restoreAfterCatch`); a
    // return whose frame is not on top moves it there (`putRotate`). The resume point is exact: a
    // stale frame's stub cannot be our return address unless its body is running, i.e. it is live.
    cold.append { [self] w in
      let keep = w.newLabel()
      w.bind(popStale)
      self.putJump(&w, to: push, unlessOnThreadStack: .r10)
      w.putPush(.rax)
      w.putMov(.rax, Memory(.r11, Self.stackArgumentsOffset - frame))
      w.putCmp(.rax, self.field(.stackLow))
      w.putJcc(.below, keep)
      // Our return address ([rsp+8] before the push) is where its body returns: a tail call.
      w.putMov(.rax, Memory(.rsp, pushes + 16))
      w.putCmp(.rax, Memory(.r11, Self.resumeOffset - frame))
      w.putJcc(.equal, keep)
      w.putPop(.rax)
      w.putSub(.r11, immediate: frame)
      w.putCmp(.r10, Memory(.r11, Self.stackArgumentsOffset - frame))
      w.putJcc(.aboveOrEqual, popStale)
      w.putJmp(push)
      w.bind(keep)
      w.putPop(.rax)
      w.putJmp(push)
    }
    cold.append { [self] w in
      w.bind(slow)
      w.putCmp(self.field(.limit), immediate: 0)
      w.putJcc(.notEqual, overflow)
      w.putCmp(self.field(.top), immediate: 0)
      w.putJcc(.notEqual, done)
      try self.putSlowCall(&w, self.setupThread, rspAligned: true, guardHeld: false)
      w.putJmp(retry)
      w.bind(overflow)
      w.putInc(self.field(.overflowed))
      w.putJmp(done)
    }
  }

  /// One user that may take exits: `taken` is not used; the user's entry decides at once, and
  /// its exit runs for every frame that reaches the return handler. Otherwise `taken` starts at
  /// 0 and each user that wants the exit sets its bit.
  private var decidesAtEntry: Bool { users.count == 1 && users[0].takesExits }

  /// Leaves the entry: traced, with ZF set and the real return address (now in the frame) taken
  /// off the stack by `ret 8`; untraced, with ZF clear (rsp is never 0) and the stack as it was.
  private func putLeaveEntry(_ w: inout X86Writer, traced: Bool) {
    if preservesAll {
      w.putPop(.r11)
      w.putPop(.r10)
    }
    if traced {
      w.putCmp(.rsp, .rsp)
      w.putRet(popping: 8)
    } else {
      w.putTest(.rsp, .rsp)
      w.putRet()
    }
  }

  /// Fills the frame at r11 (not yet published): site, real return, stack arguments, depth (and
  /// taken = 0 unless the one user decides at the entry).
  private func putFillFrame(_ w: inout X86Writer) {
    let pushes = entryPushes
    w.putLea(.r10, Memory(.rsp, pushes + 16))
    w.putMov(Memory(.r11, Self.stackArgumentsOffset), .r10)
    w.putMov(.r10, Memory(.rsp, pushes + 8))
    w.putMov(Memory(.r11, Self.returnOffset), .r10)
    w.putMov(.r10, Memory(.rsp, pushes))
    w.putLea(.r10, Memory(.r10, Self.stubResumeOffset - 5))
    w.putMov(Memory(.r11, Self.resumeOffset), .r10)
    w.putMov(.r10, Memory(.r10, Self.stubSiteOffset - Self.stubResumeOffset))
    w.putMov(Memory(.r11, Self.siteOffset), .r10)
    w.putMov(.r10, Memory(.r11, Self.depthOffset - Self.frameSize))
    w.putAdd(.r10, immediate: 1)
    w.putMov(Memory(.r11, Self.depthOffset), .r10)
    if !decidesAtEntry { w.putMov(Memory(.r11, Self.takenOffset), immediate: 0) }
  }

  /// The model's argument registers into the frame (the handlers' `call`); rbx holds the frame
  /// across the handler calls (saved below the entry's return address, which keeps rsp 16-byte
  /// aligned at the calls).
  private func putEntryWithHandlers(
    _ w: inout X86Writer, declined: Label?, cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    TrampolineEmitter.putSaveArguments(&w, model, base: .r11)
    w.putPush(.rbx)
    if preservesAll {
      putAlignStack(&w)
      w.putSub(.rsp, immediate: Int32(upperVectorRegisters.count) * 16)
      putSaveVectors(&w, upperVectorRegisters, at: 0)
    } else {
      w.putSub(.rsp, immediate: 8)
    }
    w.putMov(.rbx, .r11)
    w.putMovByte(.fs(guardOffset), immediate: 1)
    for user in users { try putUserEntry(&w, user, withHandlers: true, declined: declined, cold: &cold) }
    putHandlersEpilogue(&w)
  }

  /// Undoes `putEntryWithHandlers`' prologue: guard clear, r11 = the frame, rbx back, the
  /// argument registers from the frame.
  private func putHandlersEpilogue(_ w: inout X86Writer) {
    w.putMovByte(.fs(guardOffset), immediate: 0)
    w.putMov(.r11, .rbx)
    if preservesAll {
      putLoadVectors(&w, upperVectorRegisters, at: 0)
      putUnalignStack(&w)
    } else {
      w.putAdd(.rsp, immediate: 8)
    }
    w.putPop(.rbx)
    TrampolineEmitter.putRestoreArguments(&w, model, base: .r11)
  }

  /// The vector registers the model does not save that handlers may change: xmm8-15 when the
  /// image preserves every register and a user may use vector registers.
  private var upperVectorRegisters: [XMMRegister] {
    preservesAll && usesVectorRegisters ? (8..<16).map { XMMRegister(UInt8($0)) } : []
  }

  /// A function without a compiler's patch site may be entered with rsp not 16-byte aligned at
  /// its caller's `call` (gcc's -fipa-stack-alignment, on at -O2, skips the alignment for
  /// callees it sees need none), so its image aligns rsp before calling anything: rbp keeps the
  /// old rsp (pushed first) until `putUnalignStack`.
  private func putAlignStack(_ w: inout X86Writer) {
    w.putPush(.rbp)
    w.putMov(.rbp, .rsp)
    w.putAnd(.rsp, immediate: -16)
  }

  private func putUnalignStack(_ w: inout X86Writer) {
    w.putMov(.rsp, .rbp)
    w.putPop(.rbp)
  }

  private func putSaveVectors(_ w: inout X86Writer, _ registers: [XMMRegister], at offset: Int32) {
    for (index, register) in registers.enumerated() { w.putMovdqu(Memory(.rsp, offset + 16 * Int32(index)), register) }
  }

  private func putLoadVectors(_ w: inout X86Writer, _ registers: [XMMRegister], at offset: Int32) {
    for (index, register) in registers.enumerated() { w.putMovdqu(register, Memory(.rsp, offset + 16 * Int32(index))) }
  }

  /// One user's entry part. With handlers, the frame pointer is reloaded from rbx (calls clobber
  /// r11); without, r11 holds it throughout. `declined`: the only user's way out when it does
  /// not take the call's exit (no `taken` bit is kept then).
  private func putUserEntry(
    _ w: inout X86Writer, _ user: GraphUserCode, withHandlers: Bool, declined: Label?,
    cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    let skip = declined ?? w.newLabel()
    if withHandlers { w.putMov(.r11, .rbx) }
    if let limit = user.depthLimit {
      w.putCmp(Memory(.r11, Self.depthOffset), immediate: Int32(clamping: limit))
      w.putJcc(.aboveOrEqual, skip)
    }
    let bit = Int32(1) << Int32(user.index)
    func take() {
      if declined == nil { w.putOr(Memory(.r11, Self.takenOffset), immediate: bit) }
    }
    switch user.kind {
    case .handlers(let entry, let exit, let cookie):
      if let entry {
        putHandlerArguments(&w, user, cookie: cookie)
        w.putCall(address: entry, orThrough: .rax)
        w.putMov(.r11, .rbx)
        if exit != nil {
          w.putTest32(.rax, .rax)
          w.putJcc(.equal, skip)
          take()
        }
      } else if exit != nil {
        take()
      }
    case .recorder(let refill):
      try putRecord(
        &w, kind: .entry, refill: refill, guardHeld: withHandlers, rspAligned: true, skip: skip, cold: &cold)
      take()
    }
    if declined == nil { w.bind(skip) }
  }

  /// rdi = frame (r11), rsi = the user's data words, rdx = the call (the frame), rcx = cookie.
  private func putHandlerArguments(_ w: inout X86Writer, _ user: GraphUserCode, cookie: UInt64) {
    w.putMov(.rdi, .r11)
    w.putLea(.rsi, Memory(.r11, Self.dataOffset + 8 * Int32(user.dataOffset)))
    w.putMov(.rdx, .r11)
    w.putMov(.rcx, immediate: cookie)
  }

  /// The recorder's event for the frame at r11 (TraceryRecord's `Event` decodes them):
  ///
  ///     entry (16 bytes): [cursor] = site | depth << 48 | 1 << 62, [cursor+8] = tsc
  ///     exit   (8 bytes): [cursor] = tsc mod 2^48 | depth << 48 | 2 << 62
  ///
  /// (depth mod 2^14). An exit needs no site (it closes the entry at its depth), and its upper
  /// time bits are the previous event's: 24 bytes per call, and fewer bytes per call is fewer
  /// fresh pages, which cost more than the code that fills them. The refill leaves 8 bytes of
  /// each chunk out of `end`, so `cursor < end` means room for either kind.
  ///
  /// Signals: a handler may run traced calls, and record their events, anywhere in this code.
  /// The event's bytes are reserved by one `xadd` on the cursor, so a handler's events never
  /// land in them (read, written into, then moved, the cursor let a handler's events land where
  /// the interrupted event then wrote its own: the file was damaged, and a program whose
  /// handlers `siglongjmp` crashed). And the stream's times must not go backwards: the cursor is
  /// marked before the time is taken, and when the reservation finds the mark moved, a handler
  /// recorded in between, with later times, before this event's bytes: its time is taken again.
  /// (A handler after the reservation writes after these bytes, with later times.) A reservation
  /// that finds the chunk full leaves the cursor past `end`; the refill seals the chunk where its
  /// room ended.
  /// Clobbers rax, rdx, r10; r11 survives (the refill stub saves it). Jumps to `skip` when no
  /// room could be found (the event is counted as dropped).
  private func putRecord(
    _ w: inout X86Writer, kind: HandlerKind, refill: UInt64, guardHeld: Bool, rspAligned: Bool, skip: Label,
    cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    let write = w.newLabel()
    let full = w.newLabel()
    func putTime(_ w: inout X86Writer) {
      w.putRdtsc()
      w.putShl(.rdx, immediate: 32)
      w.putOr(.rax, .rdx)
    }
    let size: UInt64 = kind == .entry ? 16 : 8
    /// Mark, time (rax), reservation: r10 = the reserved bytes (the cursor's old value), the
    /// cursor moved past them; to `retime` when a handler recorded in between.
    func putReservation(_ w: inout X86Writer, retime: Label) {
      w.putMov(.r10, field(.cursor))
      w.putMov(field(.mark), .r10)
      putTime(&w)
      w.putMov(.r10, immediate: size)
      w.putXadd(field(.cursor), .r10)
      w.putCmp(.r10, field(.mark))
      w.putJcc(.notEqual, retime)
    }
    let retime = w.newLabel()
    let checked = w.newLabel()
    putReservation(&w, retime: retime)
    w.bind(checked)
    w.putCmp(.r10, field(.end))
    w.putJcc(.aboveOrEqual, full)
    w.bind(write)
    w.putMov(.rdx, Memory(.r11, Self.depthOffset))
    w.putAnd(.rdx, immediate: Self.depthMask)
    w.putOr(.rdx, immediate: Int32(kind.rawValue) << (TRACERY_EVENT_KIND_SHIFT - TRACERY_EVENT_DEPTH_SHIFT))
    w.putShl(.rdx, immediate: UInt8(TRACERY_EVENT_DEPTH_SHIFT))
    if kind == .entry {
      w.putMov(Memory(.r10, 8), .rax)
      w.putOr(.rdx, Memory(.r11, Self.siteOffset))
      w.putMov(Memory(.r10, 0), .rdx)
    } else {
      w.putShl(.rax, immediate: 16)
      w.putShr(.rax, immediate: 16)
      w.putOr(.rax, .rdx)
      w.putMov(Memory(.r10, 0), .rax)
    }
    cold.append { w in
      // A handler recorded between the mark and the reservation: this event's bytes follow its
      // events, so its time is taken now (exits too: the body returned before the handler ran,
      // but its exit comes after the handler's in the stream).
      w.bind(retime)
      putTime(&w)
      w.putJmp(checked)
    }
    cold.append { [self] w in
      let again = w.newLabel()
      w.bind(full)
      // r10 (the reservation) survives the call.
      try self.putSlowCall(&w, refill, rspAligned: rspAligned, guardHeld: guardHeld)
      // An entry's time is taken again: the refill (a thread's first event creates its file) is
      // the tracer's time, not the call's. An exit keeps the time its body ended.
      if kind == .entry { putTime(&w) }
      // The refill half way through a thread's first chunk only moves `end`: the reservation
      // stands (the cursor is just past it, the mark unchanged), else the bytes stayed zero
      // among the events. A new chunk clears the mark: its mapping may follow the old one's,
      // and the cursor then looks just past the reservation (which then went over the new
      // chunk's seal).
      w.putCmp(.r10, self.field(.mark))
      w.putJcc(.notEqual, again)
      w.putLea(.rdx, Memory(.r10, Int32(size)))
      w.putCmp(.rdx, self.field(.cursor))
      w.putJcc(.notEqual, again)
      w.putCmp(.r10, self.field(.end))
      w.putJcc(.below, write)
      // A new chunk (or none): bytes reserved in it as above, mark first, the time taken again
      // (a handler may record once the refill has returned; an exit at a chunk's end shows the
      // refill in its time).
      let retimeAgain = w.newLabel()
      let checkedAgain = w.newLabel()
      w.bind(again)
      putReservation(&w, retime: retimeAgain)
      w.bind(checkedAgain)
      w.putCmp(.r10, self.field(.end))
      w.putJcc(.below, write)
      w.putInc(self.field(.dropped))
      w.putJmp(skip)
      w.bind(retimeAgain)
      putTime(&w)
      w.putJmp(checkedAgain)
    }
  }

  private static let callClobbered: [Register] = [.rax, .rcx, .rdx, .rsi, .rdi, .r8, .r9, .r10, .r11]
  /// The call-clobbered registers a return neither hands back (rax, rdx) nor saves first (r10,
  /// r11): what a preserve-all return keeps around its handlers and `putRotate`.
  private static let returnScratch: [Register] = [.rcx, .rsi, .rdi, .r8, .r9]

  /// Calls `void target(void)` preserving every register a C call may clobber (rax, rcx, rdx,
  /// rsi, rdi, r8-r11, and the whole vector state with `xsave`, else xmm0-7, xmm8-15 too when the
  /// image preserves every register), with the guard held and the program's signals blocked.
  private func putSlowCall(_ w: inout X86Writer, _ target: UInt64, rspAligned: Bool, guardHeld: Bool) throws {
    if XState.current.size > 0 {
      putSlowCallSavingState(&w, target, guardHeld: guardHeld)
      return
    }
    let vectors = (0..<(preservesAll ? 16 : 8)).map { XMMRegister(UInt8($0)) }
    // 9 words, 8 or 16 vectors and two signal-mask words: rsp 8 mod 16 after it; aligned at the
    // call with 8 more when it was aligned before (always, after aligning it).
    if preservesAll { putAlignStack(&w) }
    let masks = Int32(Self.callClobbered.count * 8 + vectors.count * 16)
    let size = masks + 16 + (rspAligned || preservesAll ? 8 : 0)
    w.putSub(.rsp, immediate: size)
    for (index, register) in Self.callClobbered.enumerated() {
      w.putMov(Memory(.rsp, 8 * Int32(index)), register)
    }
    putSaveVectors(&w, vectors, at: 72)
    putBlockSignals(&w, at: masks)
    if !guardHeld { w.putMovByte(.fs(guardOffset), immediate: 1) }
    w.putMov(.rax, immediate: target)
    w.putCall(.rax)
    if !guardHeld { w.putMovByte(.fs(guardOffset), immediate: 0) }
    putRestoreSignals(&w, at: masks)
    putLoadVectors(&w, vectors, at: 72)
    for (index, register) in Self.callClobbered.enumerated() {
      w.putMov(register, Memory(.rsp, 8 * Int32(index)))
    }
    if preservesAll {
      putUnalignStack(&w)
    } else {
      w.putAdd(.rsp, immediate: size)
    }
  }

  /// The refill's call with the whole vector state kept (`xsave`): the refill runs Swift and libc
  /// code, whose AVX routines end in `vzeroupper`, and a traced function's 256- or 512-bit
  /// arguments or result (ymm/zmm0-7) lost their upper halves when a refill came between the
  /// caller and the body (an AVX2 program summed wrong under `record`). The call-clobbered
  /// registers and rbx (which holds rsp from before the 64-byte alignment) below.
  private func putSlowCallSavingState(_ w: inout X86Writer, _ target: UInt64, guardHeld: Bool) {
    let saved = Self.callClobbered + [.rbx]
    let masks = Int32(saved.count * 8)
    let size = masks + 16
    w.putSub(.rsp, immediate: size)
    for (index, register) in saved.enumerated() { w.putMov(Memory(.rsp, 8 * Int32(index)), register) }
    putBlockSignals(&w, at: masks)
    w.putMov(.rbx, .rsp)
    w.putSub(.rsp, immediate: Int32(XState.current.size))
    w.putAnd(.rsp, immediate: -64)
    // The header must be zero for `xrstor` (only what `xsave` writes is ours).
    w.putMov(.rax, immediate: 0)
    for offset in stride(from: Int32(512), to: 576, by: 8) { w.putMov(Memory(.rsp, offset), .rax) }
    func putComponents() {
      w.putMov(.rax, immediate: XState.current.components & 0xffff_ffff)
      w.putMov(.rdx, immediate: XState.current.components >> 32)
    }
    putComponents()
    w.putXsave64(Memory(.rsp))
    if !guardHeld { w.putMovByte(.fs(guardOffset), immediate: 1) }
    w.putMov(.rax, immediate: target)
    w.putCall(.rax)
    if !guardHeld { w.putMovByte(.fs(guardOffset), immediate: 0) }
    putComponents()
    w.putXrstor64(Memory(.rsp))
    w.putMov(.rsp, .rbx)
    putRestoreSignals(&w, at: masks)
    for (index, register) in saved.enumerated() { w.putMov(register, Memory(.rsp, 8 * Int32(index))) }
    w.putAdd(.rsp, immediate: size)
  }

  /// Blocks the signals a program handles (all but the synchronous ones, which a fault raises,
  /// and the reclaimer's snapshot signal) for the refill or set-up call, by a system call of its
  /// own (a library's `sigprocmask` may be traced): the mask before at [rsp + offset], the one
  /// blocked at [rsp + offset + 8]. A program's handler may `siglongjmp` out of wherever it
  /// interrupted the program, which must not be the middle of the refill (Swift and libc code
  /// holding locks: abandoned there, the program crashed later); it runs once the mask is back,
  /// in generated code, which has then left nothing half done.
  /// In a sandboxed process (`ctracery_sandboxed`) no system call: the mask word at
  /// [rsp + offset] is then all ones, which no real mask is (SIGKILL is never blocked), and
  /// `putRestoreSignals` makes none either.
  private func putBlockSignals(_ w: inout X86Writer, at offset: Int32) {
    let block = w.newLabel()
    let done = w.newLabel()
    w.putMov(.rax, immediate: UInt64(UInt(bitPattern: ctracery_sandboxed())))
    w.putCmpByte(Memory(.rax, 0), immediate: 0)
    w.putJcc(.equal, block)
    w.putMov(Memory(.rsp, offset), immediate: -1)
    w.putJmp(done)
    w.bind(block)
    w.putMov(.rax, immediate: Self.handledSignals)
    w.putMov(Memory(.rsp, offset + 8), .rax)
    w.putMov(.rax, immediate: 14)  // rt_sigprocmask
    w.putMov(.rdi, immediate: 0)  // SIG_BLOCK
    w.putLea(.rsi, Memory(.rsp, offset + 8))
    w.putLea(.rdx, Memory(.rsp, offset))
    w.putMov(.r10, immediate: 8)
    w.putSyscall()
    w.bind(done)
  }

  /// Puts back the mask `putBlockSignals` kept at [rsp + offset]; a signal that came meanwhile
  /// is delivered here. Nothing when none was blocked (the word is all ones).
  private func putRestoreSignals(_ w: inout X86Writer, at offset: Int32) {
    let done = w.newLabel()
    w.putCmp(Memory(.rsp, offset), immediate: -1)
    w.putJcc(.equal, done)
    w.putMov(.rax, immediate: 14)  // rt_sigprocmask
    w.putMov(.rdi, immediate: 2)  // SIG_SETMASK
    w.putLea(.rsi, Memory(.rsp, offset))
    w.putMov(.rdx, immediate: 0)
    w.putMov(.r10, immediate: 8)
    w.putSyscall()
    w.bind(done)
  }

  /// Every signal but SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV, SIGSYS and the snapshot signal
  /// (bit n - 1 for signal n).
  static let handledSignals: UInt64 = {
    let kept = [SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV, SIGSYS, ctracery_snapshot_signal()]
    return kept.reduce(UInt64.max) { $0 & ~(1 << UInt64($1 - 1)) }
  }()

  // MARK: - Return handler

  private func emitReturn(_ w: inout X86Writer, cold: inout [(inout X86Writer) throws -> Void]) throws {
    let find = w.newLabel()
    let found = w.newLabel()
    let corrupt = w.newLabel()
    // rsp = the frame's stack arguments (the slot + 8): the frame is the topmost one whose stack
    // arguments are rsp. Frames above it belong to other stacks or ended (`putRotate`).
    // Preserving every register: the slot left free, r10 and r11 below it, and r10 = the stack
    // arguments while the frame is looked for.
    if preservesAll {
      w.putSub(.rsp, immediate: 8)
      w.putPush(.r10)
      w.putPush(.r11)
    }
    func compareStackArguments(_ w: inout X86Writer) {
      if preservesAll {
        w.putCmp(.r10, Memory(.r11, Self.stackArgumentsOffset))
      } else {
        w.putCmp(.rsp, Memory(.r11, Self.stackArgumentsOffset))
      }
    }
    w.putMov(.r11, field(.top))
    w.putSub(.r11, immediate: Self.frameSize)
    if preservesAll { w.putLea(.r10, Memory(.rsp, 24)) }
    compareStackArguments(&w)
    w.putJcc(.notEqual, find)
    w.bind(found)
    try putReturnFound(&w, popping: 0, cold: &cold)
    // The same for a function that popped 8 bytes above its return address (`ret 8`, below).
    let foundPopped = w.newLabel()
    w.bind(foundPopped)
    try putReturnFound(&w, popping: 8, cold: &cold)
    cold.append { [self] w in
      let calleePopped = w.newLabel()
      let searchPopped = w.newLabel()
      let matchedPopped = w.newLabel()
      w.bind(find)
      w.putCmp(Memory(.r11, Self.stackArgumentsOffset), immediate: -1)
      w.putJcc(.equal, calleePopped)
      w.putSub(.r11, immediate: Self.frameSize)
      compareStackArguments(&w)
      w.putJcc(.notEqual, find)
      // Found below others.
      self.putRotateThenJump(&w, to: found)
      // No frame's stack arguments are rsp: the function may have popped 8 bytes with its
      // return. Swift's async functions do (`swiftasynccc`/`swifttailcc`: the callee pops an
      // 8-byte argument area, `ret 8`, and the executor that called it takes 8 off rsp after
      // the call; the word is the caller's, and stays as it is), so the return's frame is the
      // topmost one whose stack arguments are rsp - 8, and the return goes back with `ret 8`
      // from the slot the call used. Looked for only after the exact search failed, so a return
      // that pops nothing is never taken for one that does.
      w.bind(calleePopped)
      if self.preservesAll {
        w.putSub(.r10, immediate: 8)
      } else {
        w.putLea(.r10, Memory(.rsp, -8))
      }
      w.putMov(.r11, self.field(.top))
      w.putSub(.r11, immediate: Self.frameSize)
      w.bind(searchPopped)
      w.putCmp(.r10, Memory(.r11, Self.stackArgumentsOffset))
      w.putJcc(.equal, matchedPopped)
      w.putCmp(Memory(.r11, Self.stackArgumentsOffset), immediate: -1)
      w.putJcc(.equal, corrupt)
      w.putSub(.r11, immediate: Self.frameSize)
      w.putJmp(searchPopped)
      w.bind(matchedPopped)
      w.putLea(.r10, Memory(.r11, Self.frameSize))
      w.putCmp(.r10, self.field(.top))
      w.putJcc(.equal, foundPopped)
      self.putRotateThenJump(&w, to: foundPopped)
      // No frame for this return (the sentinel, whose stack arguments are the highest address,
      // was reached): the shadow stack is corrupt and the real return address is unknown. Stop
      // here, visibly, rather than return somewhere wrong.
      w.bind(corrupt)
      w.putUd2()
    }
  }

  /// The return's frame (r11) lies below others: moved above them (`putRotate`), then on to
  /// `label`.
  private func putRotateThenJump(_ w: inout X86Writer, to label: Label) {
    if preservesAll {
      for register in Self.returnScratch { w.putPush(register) }
      putRotate(&w, stackArguments: 24 + 8 * Int32(Self.returnScratch.count))
      for register in Self.returnScratch.reversed() { w.putPop(register) }
    } else {
      putRotate(&w, stackArguments: 0)
    }
    w.putJmp(label)
  }

  /// The return's frame is r11, on top: its exits, pop it, return to the real return address.
  /// `popping` 8: the function returned with `ret 8`, so rsp is 8 above the slot + 8; everything
  /// here then runs 8 bytes lower (what the entry of the return handler pushed moves down), the
  /// real return goes back into the slot the call used, and the return pops 8 bytes above it as
  /// the function did: the word above the slot is the caller's, and never written.
  private func putReturnFound(
    _ w: inout X86Writer, popping: UInt16, cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    if popping > 0 {
      w.putSub(.rsp, immediate: Int32(popping))
      if preservesAll {
        // Saved r11 and r10 down to [rsp] and [rsp + 8]; [rsp + 16] is then the slot.
        w.putMov(.r10, Memory(.rsp, Int32(popping)))
        w.putMov(Memory(.rsp, 0), .r10)
        w.putMov(.r10, Memory(.rsp, Int32(popping) + 8))
        w.putMov(Memory(.rsp, 8), .r10)
      }
    }
    // The real return address back into the slot: rsp = slot, 8 mod 16 (or 24 below it).
    w.putMov(.r10, Memory(.r11, Self.returnOffset))
    if preservesAll {
      w.putMov(Memory(.rsp, 16), .r10)
    } else {
      w.putPush(.r10)
    }
    if hasHandlers {
      TrampolineEmitter.putSaveReturn(&w, model, base: .r11)
      // What the model's results leave out, when every register is preserved.
      let scratch = Self.returnScratch
      let vectors = usesVectorRegisters ? (2..<16).map { XMMRegister(UInt8($0)) } : []
      // The words, rounded up to 16 bytes, then the vectors.
      let vectorsAt = Int32((8 * scratch.count + 15) & ~15)
      if preservesAll {
        putAlignStack(&w)
        w.putSub(.rsp, immediate: vectorsAt + Int32(16 * vectors.count))
        for (index, register) in scratch.enumerated() { w.putMov(Memory(.rsp, 8 * Int32(index)), register) }
        putSaveVectors(&w, vectors, at: vectorsAt)
        w.putPush(.rbx)
        w.putSub(.rsp, immediate: 8)  // rsp aligned at the calls
      } else {
        w.putPush(.rbx)  // rsp aligned at the calls
      }
      w.putMov(.rbx, .r11)
      w.putMovByte(.fs(guardOffset), immediate: 1)
      for user in users { try putUserExit(&w, user, withHandlers: true, cold: &cold) }
      w.putMovByte(.fs(guardOffset), immediate: 0)
      w.putMov(.r11, .rbx)
      if preservesAll {
        w.putAdd(.rsp, immediate: 8)
        w.putPop(.rbx)
        putLoadVectors(&w, vectors, at: vectorsAt)
        for (index, register) in scratch.enumerated() { w.putMov(register, Memory(.rsp, 8 * Int32(index))) }
        putUnalignStack(&w)
      } else {
        w.putPop(.rbx)
      }
      TrampolineEmitter.putLoadReturn(&w, model, base: .r11)
    } else {
      w.putPush(.rax)
      w.putPush(.rdx)
      for user in users { try putUserExit(&w, user, withHandlers: false, cold: &cold) }
      w.putPop(.rdx)
      w.putPop(.rax)
    }
    // Returning into the stub of the frame below (its tail call), whose stack arguments are not
    // ours: the tail call moved the return address (Swift's), and that frame's return comes
    // where ours did. r10 is free here (restored below when every register is kept).
    let sameStack = w.newLabel()
    w.putMov(.r10, Memory(.r11, Self.returnOffset))
    w.putCmp(.r10, Memory(.r11, Self.resumeOffset - Self.frameSize))
    w.putJcc(.notEqual, sameStack)
    w.putMov(.r10, Memory(.r11, Self.stackArgumentsOffset))
    w.putMov(Memory(.r11, Self.stackArgumentsOffset - Self.frameSize), .r10)
    w.bind(sameStack)
    w.putMov(field(.top), .r11)
    if preservesAll {
      w.putPop(.r11)
      w.putPop(.r10)
    }
    if popping > 0 { w.putRet(popping: popping) } else { w.putRet() }
  }

  /// The return's frame (r11) lies below others, which belong to other stacks (a coroutine
  /// suspended inside a traced call, a signal handler left by siglongjmp) or ended on this one
  /// (longjmp): frames that ended on the thread's own stack below us are dropped, the others
  /// kept, and the return's frame moved above them, so the return pops it and nothing else.
  ///
  /// While frames move, top points one frame past a guard frame (stack arguments -1: never taken
  /// for stale, never matched), so a signal handler's traced calls push above it and cannot land
  /// on a frame being moved. Uses rcx, rsi, rdi, r8-r11 (free at a return); rax, rdx, xmm0-1 hold
  /// the results. The shadow stack keeps a frame of room for the guard (`GraphThreads`).
  /// `stackArguments`: the return's stack arguments are at rsp + that.
  private func putRotate(_ w: inout X86Writer, stackArguments: Int32) {
    let frame = Self.frameSize
    let next = w.newLabel()
    let keep = w.newLabel()
    let placed = w.newLabel()
    // One frame from [rsi] to [rdi]; both move past it.
    func copyFrame() {
      w.putMov(.rcx, immediate: UInt64(frame / 8))
      w.putRepMovsq()
    }
    w.putMov(.r8, field(.top))
    w.putMov(Memory(.r8, Self.stackArgumentsOffset), immediate: -1)
    w.putLea(.r9, Memory(.r8, frame))
    w.putMov(field(.top), .r9)
    // The return's frame, below rsp meanwhile.
    w.putSub(.rsp, immediate: frame)
    w.putMov(.rsi, .r11)
    w.putMov(.rdi, .rsp)
    copyFrame()
    w.putMov(.rdi, .r11)
    w.putLea(.rsi, Memory(.r11, frame))
    w.bind(next)
    w.putCmp(.rsi, .r8)
    w.putJcc(.aboveOrEqual, placed)
    // Dropped: we are on the thread's own stack, and so is the frame, below us.
    w.putMov(.r9, Memory(.rsi, Self.stackArgumentsOffset))
    w.putLea(.r10, Memory(.rsp, frame + stackArguments))
    putJump(&w, to: keep, unlessOnThreadStack: .r10)
    w.putCmp(.r9, field(.stackLow))
    w.putJcc(.below, keep)
    w.putCmp(.r9, .r10)
    w.putJcc(.aboveOrEqual, keep)
    w.putAdd(.rsi, immediate: frame)
    w.putJmp(next)
    w.bind(keep)
    copyFrame()
    w.putJmp(next)
    w.bind(placed)
    w.putMov(.r11, .rdi)
    w.putMov(.rsi, .rsp)
    copyFrame()
    w.putAdd(.rsp, immediate: frame)
    w.putLea(.r10, Memory(.r11, frame))
    w.putMov(field(.top), .r10)
  }

  /// Jumps to `label` unless `register` lies on the thread's own stack (`stack_low` to
  /// `stack_high` of `ctracery_thread`).
  private func putJump(_ w: inout X86Writer, to label: Label, unlessOnThreadStack register: Register) {
    w.putCmp(register, field(.stackLow))
    w.putJcc(.below, label)
    w.putCmp(register, field(.stackHigh))
    w.putJcc(.aboveOrEqual, label)
  }

  private func putUserExit(
    _ w: inout X86Writer, _ user: GraphUserCode, withHandlers: Bool, cold: inout [(inout X86Writer) throws -> Void]
  ) throws {
    let skip = w.newLabel()
    if withHandlers { w.putMov(.r11, .rbx) }
    let bit = Int32(1) << Int32(user.index)
    switch user.kind {
    case .handlers(_, let exit, let cookie):
      guard let exit else { return }
      if !decidesAtEntry {
        w.putTest(Memory(.r11, Self.takenOffset), immediate: bit)
        w.putJcc(.equal, skip)
      }
      w.putMov(.r10, immediate: user.generationAddress)
      w.putCmp(Memory(.r10), immediate: Int32(truncatingIfNeeded: user.generation))
      w.putJcc(.notEqual, skip)
      putHandlerArguments(&w, user, cookie: cookie)
      w.putCall(address: exit, orThrough: .rax)
    case .recorder(let refill):
      if !decidesAtEntry {
        w.putTest(Memory(.r11, Self.takenOffset), immediate: bit)
        w.putJcc(.equal, skip)
      }
      try putRecord(
        &w, kind: .exit, refill: refill, guardHeld: withHandlers, rspAligned: withHandlers, skip: skip, cold: &cold)
    }
    w.bind(skip)
  }
}
