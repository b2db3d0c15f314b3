import TraceryX86

/// Generates a global multi-attach trampoline (the kernel's `bpf_global_caller_N` from its tracing multi-link RFC): one per
/// argument class and lookup mode, shared by every function of that class. Called from a site
/// (`call`; [rsp] = the body, right after the site, [rsp+8] = the real return; rsp 16-byte
/// aligned: sites whose body follows the branch, `PatchSite.bodyFollowsBranch`), it finds the
/// function's record (`MultiTable`) by the site address and runs the record's handlers:
///
///     if this thread is inside a handler: return into the body
///     save the class's argument registers into a tracery_call
///     record = padding: [site - 8]; hash: the stub's record word when entered from a
///              `MultiStub` and it is not 0, else probe the current table for site (none:
///              return into the body). The record (or the table while probing) is kept at [rsp+272]: a
///              hazard the reclaimer's stack scan sees; before that store it is in r11, which
///              the reclaimer's snapshot of the thread's registers sees
///     one handler alone (the record's shape): its kind's path below without loops; else entry
///     handlers; no exit or modify-return handlers:
///     restore, return into the body
///     modify-return handlers (any non-zero: skip the body); the body, called with the
///     arguments as the handlers left them; exit handlers; return to the real caller
///
/// Functions with exit or modify-return handlers enter through a `MultiStub` instead
/// (`viaStub`): then [rsp] = stub + 5, and the site and the body are read from the stub.
///
/// The record's layout is `MultiRecord`'s. A class has no stack arguments (at most six integer
/// and eight vector arguments), so the trampoline may call the body from its own frame.
struct MultiEmitter {
  enum Lookup: Equatable {
    /// The record pointer is in the 8 bytes before the function's entry (its NOP padding).
    case padding
    /// The word at this address holds the current hash table (0: none): word 0 the shift, word 1
    /// the mask, then (site, record) pairs: a `SiteHash` table.
    case hash(table: UInt64)
  }

  let model: FunctionModel
  let lookup: Lookup
  let guardOffset: Int32
  /// Entered from a function's `MultiStub` (the site `jmp`s to the stub, the stub `call`s this
  /// trampoline): [rsp] = stub + 5, and the site is in the stub (`MultiStub.siteOffset`). Every
  /// call then has its return (the body's `call` from here, this trampoline's `ret` to the
  /// stub, the stub's `ret` to the caller), so exits cost no return misprediction. Without a
  /// stub the site `call`s the trampoline and, with exit handlers, the trampoline returns past
  /// that call: the return stack buffer is off by one and returns mispredict (+10 ns a call).
  var viaStub = false
  /// Entry handlers only, for relocated functions entered through a `PrologueStub` ([rsp] = its
  /// copy, the function and the site in the stub's first words): every call-clobbered register is kept (the
  /// frame aligned, as `TrampolineEmitter.preservesAll` does), and the trampoline returns into
  /// the stub, where the function's moved instructions follow.
  var keepsEveryRegister = false

  static let frame: Int32 = 304
  static let hazard: Int32 = 272
  static let cursor: Int32 = 280
  static let remaining: Int32 = 288
  static let skip: Int32 = 296

  /// The class of a model: integer arguments 0-6, with or without vector arguments (and rax).
  static func classModel(integerArguments: Int, floats: Bool) -> FunctionModel {
    FunctionModel(
      integerArguments: integerArguments, floatArguments: floats ? 8 : 0, stackArgumentWords: 0,
      returns: .unknown, isVariadic: floats)
  }

  func emit(at base: UInt64) throws -> [UInt8] {
    if keepsEveryRegister { return try emitKeepingEveryRegister(at: base) }
    var w = X86Writer(base: base)
    let pass = w.newLabel()
    let intoBody = w.newLabel()
    let entryOnly = w.newLabel()
    let size = Self.frame
    let guardByte = Memory.fs(guardOffset)
    w.putCmpByte(guardByte, immediate: 0)
    w.putJcc(.notEqual, pass)
    w.putSub(.rsp, immediate: size)
    TrampolineEmitter.putSaveArguments(&w, model)
    w.putMov(.r10, Memory(.rsp, size))
    if viaStub, case .hash = lookup {
      // The stub's record word: no lookup unless it is 0. The site from the stub either way.
      w.putMov(.r11, Memory(.r10, MultiStub.recordOffset - MultiStub.returnOffset))
      w.putMovsxd(.rax, Memory(.r10, MultiStub.siteOffset - MultiStub.returnOffset))
      w.putAdd(.r10, .rax)
      try putLookup(&w, notFound: intoBody, recordInR11: true)
    } else if viaStub {
      w.putMovsxd(.r11, Memory(.r10, MultiStub.siteOffset - MultiStub.returnOffset))
      w.putAdd(.r10, .r11)
      try putLookup(&w, notFound: intoBody)
    } else {
      // The site's `call` (5 bytes) returns right after it.
      w.putSub(.r10, immediate: Int32(SiteBytes.length))
      try putLookup(&w, notFound: intoBody)
    }
    // The register view: function = site, return address, stack arguments.
    TrampolineEmitter.putRegisterView(
      &w, function: .register(.r10), returnAddress: Memory(.rsp, size + 8), stackArguments: Memory(.rsp, size + 16),
      scratch: .r10)
    w.putMovByte(guardByte, immediate: 1)
    // The body of the function (through the stub's `jmp`, or the return address of the site's call),
    // called with the arguments as the handlers left them and the guard clear. A body that
    // returns with `ret 8` (Swift's async convention pops 8 bytes above its return address; the
    // word is the caller's, and not written) leaves rsp 8 mod 16 (it was aligned at the call):
    // rsp goes back to the frame, and the view's `reserved` word says so to the return.
    var popped: [(fix: Label, back: Label)] = []
    func putCallBody() {
      w.putMovByte(guardByte, immediate: 0)
      TrampolineEmitter.putRestoreArguments(&w, model)
      if viaStub {
        putBodyAddress(&w, stubReturn: Memory(.rsp, size))
        w.putCall(.r11)
      } else {
        w.putCall(Memory(.rsp, size))
      }
      let fix = w.newLabel()
      let back = w.newLabel()
      w.putTest(.rsp, immediate: 8)
      w.putJcc(.notEqual, fix)
      w.bind(back)
      popped.append((fix, back))
    }
    func putCallSingle() {
      w.putMov(.rdi, .rsp)
      w.putMov(.rsi, Memory(.r11, MultiRecord.pairsOffset + 8))
      w.putCall(Memory(.r11, MultiRecord.pairsOffset))
    }
    func putUnlessShape(_ kind: HandlerKind, jumpTo label: Label) {
      w.putCmp(Memory(.r11, MultiRecord.shapeOffset), immediate: Int32(kind.rawValue))
      w.putJcc(.notEqual, label)
    }
    let exitsDone = w.newLabel()
    let returnToCaller = w.newLabel()
    // The common cases, one handler alone: no loops.
    let notEntry = w.newLabel()
    putUnlessShape(.entry, jumpTo: notEntry)
    putCallSingle()
    // Its own copy of the epilogue: one taken branch fewer on the common path.
    w.putMovByte(guardByte, immediate: 0)
    TrampolineEmitter.putRestoreArguments(&w, model)
    w.putAdd(.rsp, immediate: size)
    if viaStub { w.putJmp(pass) } else { w.putRet() }
    w.bind(notEntry)
    // Not popped (yet): see `putCallBody`.
    w.putMov(Memory(.rsp, TrampolineEmitter.reservedOffset), immediate: 0)
    let notExit = w.newLabel()
    putUnlessShape(.exit, jumpTo: notExit)
    putCallBody()
    w.putMovByte(guardByte, immediate: 1)
    TrampolineEmitter.putSaveReturn(&w, model)
    w.putMov(.r11, Memory(.rsp, Self.hazard))
    putCallSingle()
    w.putJmp(exitsDone)
    w.bind(notExit)
    let general = w.newLabel()
    putUnlessShape(.modifyReturn, jumpTo: general)
    putCallSingle()
    // Non-zero: the body is skipped and the handler's return value (in the view) returned.
    w.putTest32(.rax, .rax)
    w.putJcc(.notEqual, exitsDone)
    putCallBody()
    w.putJmp(returnToCaller)
    w.bind(general)
    let entries = MultiRecord.countOffset(.entry)
    let modifyReturns = MultiRecord.countOffset(.modifyReturn)
    let exits = MultiRecord.countOffset(.exit)
    putHandlers(&w, count: entries, first: { _ in MultiRecord.pairsOffset }, modifyReturn: false)
    w.putMov(.r11, Memory(.rsp, Self.hazard))
    w.putMov(.r10, Memory(.r11, modifyReturns))
    w.putOr(.r10, Memory(.r11, exits))
    w.putTest(.r10, .r10)
    w.putJcc(.equal, entryOnly)
    // Modify-return handlers, then the body unless one asked to skip it.
    let skipBody = w.newLabel()
    w.putMov(Memory(.rsp, Self.skip), immediate: 0)
    putHandlers(&w, count: modifyReturns, first: Self.pairsAfter(entries), modifyReturn: true)
    w.putCmp(Memory(.rsp, Self.skip), immediate: 0)
    w.putJcc(.notEqual, skipBody)
    putCallBody()
    w.putMovByte(guardByte, immediate: 1)
    TrampolineEmitter.putSaveReturn(&w, model)
    w.bind(skipBody)
    putHandlers(&w, count: exits, first: Self.pairsAfter(entries, modifyReturns), modifyReturn: false)
    w.bind(exitsDone)
    w.putMovByte(guardByte, immediate: 0)
    TrampolineEmitter.putLoadReturn(&w, model)
    w.bind(returnToCaller)
    let poppedReturn = w.newLabel()
    w.putCmp(Memory(.rsp, TrampolineEmitter.reservedOffset), immediate: 0)
    w.putJcc(.notEqual, poppedReturn)
    if viaStub {
      // Back to the stub, whose `ret` returns to the real caller.
      w.putAdd(.rsp, immediate: size)
      w.putRet()
    } else {
      // Drop the frame and the return into the body: back to the real caller.
      w.putAdd(.rsp, immediate: size + 8)
      w.putRet()
    }
    w.bind(entryOnly)
    w.putMovByte(guardByte, immediate: 0)
    w.bind(intoBody)
    TrampolineEmitter.putRestoreArguments(&w, model)
    w.putAdd(.rsp, immediate: size)
    w.bind(pass)
    if viaStub {
      // Into the body with [rsp] = stub + 5: its return goes through the stub's `ret`.
      putBodyAddress(&w, stubReturn: Memory(.rsp, 0))
      w.putJmp(.r11)
    } else {
      w.putRet()
    }
    // The body popped 8 bytes with its return: back to the frame, then straight to the real
    // caller (past the stub's return, if any) with the same `ret 8`.
    for (fix, back) in popped {
      w.bind(fix)
      w.putSub(.rsp, immediate: 8)
      w.putMov(Memory(.rsp, TrampolineEmitter.reservedOffset), immediate: 8)
      w.putJmp(back)
    }
    w.bind(poppedReturn)
    w.putAdd(.rsp, immediate: size + 8)
    w.putRet(popping: 8)
    return try w.finish()
  }

  /// The frame below the aligned rsp of `emitKeepingEveryRegister`: this trampoline's usual
  /// frame, then the registers `TrampolineEmitter.putKeepAll` keeps.
  static let keepingFrame: Int32 =
    (frame + TrampolineEmitter.keepingFrameSize - TrampolineEmitter.frameSize + 15) / 16 * 16

  /// The `keepsEveryRegister` form (entry handlers only):
  ///
  ///     if this thread is inside a handler: return into the stub
  ///     push rbp; mov rbp, rsp; and rsp, -16; the frame: the class's arguments in a tracery_call,
  ///     every other call-clobbered register below it
  ///     site = the stub's site word; the record as `putLookup` finds it (none: restore and return)
  ///     the record's entry handlers (the view's function: the stub's function word)
  ///     restore every register, leave, return into the stub (the moved instructions)
  private func emitKeepingEveryRegister(at base: UInt64) throws -> [UInt8] {
    var w = X86Writer(base: base)
    let pass = w.newLabel()
    let restore = w.newLabel()
    let handlersDone = w.newLabel()
    let guardByte = Memory.fs(guardOffset)
    // Where `putKeepAll` puts what it keeps: past this trampoline's own slots.
    let kept = Self.frame - TrampolineEmitter.frameSize
    w.putCmpByte(guardByte, immediate: 0)
    w.putJcc(.notEqual, pass)
    w.putPush(.rbp)
    w.putMov(.rbp, .rsp)
    w.putAnd(.rsp, immediate: -16)
    w.putSub(.rsp, immediate: Self.keepingFrame)
    TrampolineEmitter.putSaveArguments(&w, model)
    TrampolineEmitter.putKeepAll(&w, frame: kept, beyond: model)
    w.putMov(.r10, Memory(.rbp, 8))
    w.putMov(.r10, Memory(.r10, Int32(PrologueStub.siteOffset - PrologueStub.copyOffset)))
    try putLookup(&w, notFound: restore)
    w.putMov(.r10, Memory(.rbp, 8))
    w.putMov(.r10, Memory(.r10, Int32(PrologueStub.functionOffset - PrologueStub.copyOffset)))
    TrampolineEmitter.putRegisterView(
      &w, function: .register(.r10), returnAddress: Memory(.rbp, 16), stackArguments: Memory(.rbp, 24),
      scratch: .r10)
    w.putMovByte(guardByte, immediate: 1)
    let several = w.newLabel()
    w.putCmp(Memory(.r11, MultiRecord.shapeOffset), immediate: Int32(HandlerKind.entry.rawValue))
    w.putJcc(.notEqual, several)
    w.putMov(.rdi, .rsp)
    w.putMov(.rsi, Memory(.r11, MultiRecord.pairsOffset + 8))
    w.putCall(Memory(.r11, MultiRecord.pairsOffset))
    w.putJmp(handlersDone)
    w.bind(several)
    putHandlers(
      &w, count: MultiRecord.countOffset(.entry), first: { _ in MultiRecord.pairsOffset }, modifyReturn: false)
    w.bind(handlersDone)
    w.putMovByte(guardByte, immediate: 0)
    w.bind(restore)
    TrampolineEmitter.putRestoreAll(&w, frame: kept, beyond: model)
    TrampolineEmitter.putRestoreArguments(&w, model)
    w.putLeave()
    w.bind(pass)
    w.putRet()
    return try w.finish()
  }

  /// r11 = the body of the function whose stub's return address is at `stubReturn`: the target
  /// of the stub's `jmp`, read from its displacement (calling the `jmp` itself cost 0.2 ns a
  /// call more). r10 and r11 are free at a function's entry (no argument lives there).
  private func putBodyAddress(_ w: inout X86Writer, stubReturn: Memory) {
    let jmpEnd = MultiStub.bodyOffset + 5 - MultiStub.returnOffset
    w.putMov(.r11, stubReturn)
    w.putMovsxd(.r10, Memory(.r11, jmpEnd - 4))
    w.putAdd(.r11, immediate: jmpEnd)
    w.putAdd(.r11, .r10)
  }

  /// The offset of the first pair of a kind: after the header and the pairs of the kinds whose
  /// counts are at `previous` (record offsets), computed at run time into r10.
  static func pairsAfter(_ previous: Int32...) -> (inout X86Writer) -> Int32 {
    { w in
      w.putMov(.r10, Memory(.r11, previous[0]))
      for offset in previous.dropFirst() { w.putAdd(.r10, Memory(.r11, offset)) }
      w.putShl(.r10, immediate: 4)
      w.putAdd(.r10, .r11)
      w.putAdd(.r10, immediate: MultiRecord.pairsOffset)
      return -1
    }
  }

  /// Calls the (handler, cookie) pairs of one kind: their count is at record + `count`; the
  /// first pair at record + the offset `first` returns (or, when it returns -1, at r10).
  /// Modify-return handlers that return non-zero set the skip flag.
  private func putHandlers(
    _ w: inout X86Writer, count: Int32, first: (inout X86Writer) -> Int32, modifyReturn: Bool
  ) {
    let loop = w.newLabel()
    let done = w.newLabel()
    let next = w.newLabel()
    w.putMov(.r11, Memory(.rsp, Self.hazard))
    w.putMov(.rax, Memory(.r11, count))
    w.putMov(Memory(.rsp, Self.remaining), .rax)
    let offset = first(&w)
    if offset >= 0 { w.putLea(.r10, Memory(.r11, offset)) }
    w.putMov(Memory(.rsp, Self.cursor), .r10)
    w.bind(loop)
    w.putCmp(Memory(.rsp, Self.remaining), immediate: 0)
    w.putJcc(.equal, done)
    w.putMov(.r10, Memory(.rsp, Self.cursor))
    w.putMov(.rdi, .rsp)
    w.putMov(.rsi, Memory(.r10, 8))
    w.putCall(Memory(.r10, 0))
    if modifyReturn {
      w.putTest32(.rax, .rax)
      w.putJcc(.equal, next)
      w.putMov(Memory(.rsp, Self.skip), immediate: 1)
    }
    w.bind(next)
    w.putAdd(Memory(.rsp, Self.cursor), immediate: 16)
    w.putAdd(Memory(.rsp, Self.remaining), immediate: -1)
    w.putJmp(loop)
    w.bind(done)
  }

  /// r10 = site on entry and exit; r11 = the record (hazard at [rsp+272]), or jumps to
  /// `notFound`. Clobbers rax, rcx, rdx, rsi, rdi (saved or not arguments of the class).
  /// `recordInR11` (hash only): r11 holds a record read from a `MultiStub`, or 0 to look it up.
  private func putLookup(_ w: inout X86Writer, notFound: Label, recordInR11: Bool = false) throws {
    switch lookup {
    case .padding:
      // No re-check after the hazard store: until the store, the reclaimer's snapshot sees the
      // record in r11 (it checks registers); the re-check cost ~0.5 ns a call.
      w.putMov(.r11, Memory(.r10, -8))
      w.putMov(Memory(.rsp, Self.hazard), .r11)
      w.putTest(.r11, .r11)
      w.putJcc(.equal, notFound)
    case .hash(let table):
      let probe = w.newLabel()
      let found = w.newLabel()
      let known = w.newLabel()
      if recordInR11 {
        // As the padding's pointer: in r11, then in the hazard slot.
        w.putMov(Memory(.rsp, Self.hazard), .r11)
        w.putTest(.r11, .r11)
        w.putJcc(.notEqual, known)
      }
      w.putMov(.rax, immediate: table)
      // The table in r11, then in the hazard slot (no re-check: see the padding case).
      w.putMov(.r11, Memory(.rax))
      w.putMov(Memory(.rsp, Self.hazard), .r11)
      w.putTest(.r11, .r11)
      w.putJcc(.equal, notFound)
      w.putMovabs(.rax, immediate: SiteHash.golden)
      w.putImul(.rax, .r10)
      w.putMov(.rcx, Memory(.r11, 0))
      w.putShrCL(.rax)
      w.bind(probe)
      w.putMov(.rsi, .rax)
      w.putShl(.rsi, immediate: 4)
      w.putAdd(.rsi, .r11)
      w.putMov(.rdi, Memory(.rsi, 16))
      w.putCmp(.rdi, .r10)
      w.putJcc(.equal, found)
      w.putTest(.rdi, .rdi)
      w.putJcc(.equal, notFound)
      w.putAdd(.rax, immediate: 1)
      w.putAnd(.rax, Memory(.r11, 8))
      w.putJmp(probe)
      w.bind(found)
      // The record lies in the table's block or in a bulk link's record block, which is retired
      // only with a table that led to it: the hazard moves from the table to the record.
      w.putMov(.r11, Memory(.rsi, 24))
      w.putMov(Memory(.rsp, Self.hazard), .r11)
      w.bind(known)
    }
  }
}
