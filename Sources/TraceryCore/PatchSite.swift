import TraceryX86

/// Where Tracery patches a function and how the function's own code goes on: the kernel's
/// `dyn_ftrace` record (one per patchable function) with what uftrace's `mcount_patch_func`
/// decides per kind of site. Every part of the engine takes the body's address from here
/// (`resume`), never from "site + 5".
///
/// The branch Tracery writes is always 5 bytes (`call`/`jmp rel32`, `SiteBytes`) at `address`;
/// it replaces the first `length` bytes of the function's code there, and `resume` is where the
/// function goes on without them: the body a trampoline calls or jumps to, and where the patcher
/// sends a thread that traps on a site being put back (`PatchRequest.resume`).
///
/// Which shapes exist, and so what `length` and `resume` are, is decided in one place: `init(at:)`.
/// Today's one shape is a compiler's NOP; a prologue moved out of line (relocated) would add one
/// whose `resume` is the moved copy.
///
/// Shared trampolines that a site enters with a `call` (ops, multi-attach entry-only) take the
/// body from the call's return address: only sites whose body follows the branch
/// (`bodyFollowsBranch`) may enter them that way; others go through a stub (`MultiStub`) or a
/// per-function trampoline, which read `resume`.
public struct PatchSite: Sendable, Hashable {
  public enum Shape: UInt8, Sendable {
    /// A 5-byte NOP the compiler left at the entry (or right after its `endbr64`):
    /// `-fpatchable-function-entry`, `-mnop-mcount`, or gcc's 1-byte NOP sled once converted
    /// (`TextPatcher.convertSleds`). The branch replaces the NOP; the body follows it.
    case nop
    /// A function without a NOP: its first whole instructions (`length` bytes, at least 5) are
    /// moved out of line by `X86Relocator`, and `resume` is that copy, which runs them and jumps
    /// back. Made when no code of its object branches into the branch's 5 bytes; while other
    /// threads run, a thread stopped inside them is moved to the copy first
    /// (`TextPatcher.moveThreadsOut`).
    case relocated
    /// A function that cannot be relocated (too short, code branches into its first bytes) or
    /// may not be now (a thread that cannot be inspected runs): an `int3` on its first
    /// instruction (`length` is
    /// that instruction's), which stays; the SIGTRAP handler sends a thread reaching it where
    /// the branch would (the kernel's uprobes, in process: ~1-2 µs a call instead of ns), and
    /// `resume` is the copy of that one instruction. Safe while other threads run: no thread can
    /// be inside one instruction. The patcher writes `int3` and the site's own next 4 bytes.
    case trap
  }

  /// The function's entry (its symbol's address).
  public let function: UInt64
  /// Where the 5-byte branch goes.
  public let address: UInt64
  /// Where the function goes on without the bytes the branch replaced.
  public let resume: UInt64
  /// How many bytes of the function's code at `address` the branch replaces (at least 5).
  public let length: UInt8
  public let shape: Shape
  /// A relocated site whose moved instructions run unchanged anywhere (`X86Relocator.check`'s
  /// `verbatim`): its copy is their bytes and a `jmp` back, made without decoding them again.
  public let movesVerbatim: Bool

  init(function: UInt64, address: UInt64, resume: UInt64, length: UInt8, shape: Shape, movesVerbatim: Bool = false) {
    self.function = function
    self.address = address
    self.resume = resume
    self.length = length
    self.shape = shape
    self.movesVerbatim = movesVerbatim
  }

  /// A compiler's 5-byte NOP at `address`, in the function that starts at `function`.
  public static func nop(at address: UInt64, function: UInt64? = nil) -> PatchSite {
    PatchSite(
      function: function ?? address, address: address, resume: address + UInt64(SiteBytes.length),
      length: UInt8(SiteBytes.length), shape: .nop)
  }

  /// The site of the function at `entry` (a mapped, executable address), by what its code
  /// holds: a 5-byte NOP at the entry, or right after an `endbr64` there. Throws the reason
  /// it has none (`nopRefusal`).
  static func at(_ entry: UInt64, function: UInt64? = nil) throws(PatchSiteError) -> PatchSite {
    guard let site = nopSite(at: entry, function: function) else { throw nopRefusal(at: entry) }
    return site
  }

  /// `at`'s site, or nil: no byte arrays and no error, as it runs per function of a large
  /// attach, most of them without a NOP when relocating.
  static func nopSite(at entry: UInt64, function: UInt64? = nil) -> PatchSite? {
    if SiteBytes(reading: entry).isNop5 { return .nop(at: entry, function: function ?? entry) }
    let address = afterEndbr64(entry)
    return SiteBytes(reading: address).isNop5 ? .nop(at: address, function: function ?? entry) : nil
  }

  /// Why the function at `entry` has no NOP site (`nopSite` found none): made only when reported.
  static func nopRefusal(at entry: UInt64) -> PatchSiteError {
    let address = afterEndbr64(entry)
    switch X86Instruction.SiteShape(bytes: TextPatcher.read(address), at: address) {
    case .nopSled:
      return PatchSiteError(
        reason: "gcc's 5×1-byte NOP sled; convert it first (TextPatcher.convertSleds, one thread only)")
    case let shape:
      return PatchSiteError(reason: "its entry holds \(shape), not a 5-byte NOP")
    }
  }

  /// Whether the body starts right after the branch, so that a `call` at the site returns into
  /// it (what shared trampolines entered by `call` rely on).
  public var bodyFollowsBranch: Bool { resume == address + UInt64(SiteBytes.length) }

  /// Whether code reaching this site must find every register as its caller left it, and may
  /// find rsp unaligned: a function built without patch sites may have gcc `-fipa-ra` callers
  /// (they keep values in call-clobbered registers it does not touch) and
  /// `-fipa-stack-alignment` ones; gcc turns both off for functions with patch sites. Every
  /// shape but a compiler's NOP is taken as such (a relocated sled too: cheaper to keep than to
  /// tell). The graph images (`GraphEmitter.preservesAll`) and the per-function trampolines
  /// (`TrampolineEmitter.preservesAll`) keep every register for these; ops and multi-attach
  /// handlers run in a per-function trampoline here, never in a shared one.
  public var keepsEveryRegister: Bool { shape != .nop }

  /// The relocated site of the function at `entry` (after its `endbr64`, which indirect calls
  /// must still find there), before its copy exists: `resume` is 0 until `withCopy(at:)`.
  /// `size` is the function's size from its symbol, for the sweep that looks for branches into
  /// the moved bytes.
  /// `entryPoints`: its object's (nil: only the function's own code is swept).
  /// `span`: the bytes from `entry` that may be read, at least `size` (a function shorter than
  /// the branch: up to where the next function starts; see `relocated(code:size:...)`).
  static func relocated(at entry: UInt64, function: UInt64, size: Int, span: Int? = nil, entryPoints: EntryPoints?)
    throws(PatchSiteError) -> PatchSite
  {
    let code = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(entry)), count: max(size, span ?? 0))
    return try relocated(code: code, size: size, entry: entry, function: function, entryPoints: entryPoints)
  }

  /// `relocated(at:function:size:entryPoints:)` decided on `code`, the function's bytes wherever
  /// they are (mapped at `entry`, or read from its file). `size`: the function's, when `code`
  /// goes on past it (nil: `code` is the function). A function shorter than the branch is
  /// relocated whole when its last instruction (`ret`, a tail `jmp`) is followed by padding in
  /// `code` (`X86Relocator.isPadding`): `code` must then end where the next function starts, so
  /// that the branch takes no byte of another function.
  static func relocated(
    code: UnsafeRawBufferPointer, size: Int? = nil, entry: UInt64, function: UInt64, entryPoints: EntryPoints?
  ) throws(PatchSiteError) -> PatchSite {
    let move = try prologueMove(code: code, size: size, entry: entry)
    let (skip, length) = (move.skip, move.length)
    let address = entry + UInt64(skip)
    let size = min(size ?? code.count, code.count)
    // Only the branch's 5 bytes are overwritten: what must not be entered is their interior (a
    // moved instruction past them stays as it was, and a branch to it still finds it).
    let overwritten = UInt64(SiteBytes.length)
    // Its own branches are among its object's entry points when their sweep read it whole: its
    // code is swept again only to say whose branch it is (a second sweep of every function was
    // a fifth of a relocating start).
    let entered = entryPoints?.first(in: (address + 1)..<(address + overwritten))
    let ownBranches =
      entryPoints?.sweptWhole(entry, size: size) == true && entered == nil
      ? []
      : X86Relocator.branchesIntoMovedRange(
        of: UnsafeRawBufferPointer(rebasing: code[..<size]), at: entry, length: skip + SiteBytes.length)
    switch ownBranches {
    case nil:
      throw PatchSiteError(
        reason: "its code cannot be read through to look for branches into its start", category: .unswept)
    case let found? where !found.isEmpty:
      throw PatchSiteError(
        reason: "its own code branches into the first 5 bytes the branch takes (at +\(found[0]))",
        category: .branchedInto)
    default: break
    }
    // Code elsewhere in the object (a .cold part, another function) or an exception landing pad.
    if let target = entered {
      throw PatchSiteError(
        reason: "its object's code (a branch, or a landing pad) enters the branch's 5 bytes at +\(target - entry)",
        category: .enteredFromElsewhere)
    }
    return PatchSite(
      function: function, address: address, resume: 0, length: UInt8(length), shape: .relocated,
      movesVerbatim: move.verbatim)
  }

  /// What `relocated(code:size:entry:...)` moves, before it looks for branches into the branch's
  /// bytes: the `endbr64` it skips, the whole instructions' `length` (`movedEnd`: where they end,
  /// before `length` when a short function moves whole and padding fills the rest), and whether
  /// they move unchanged (`movesVerbatim`). It reads only those bytes (and the padding).
  static func prologueMove(code: UnsafeRawBufferPointer, size: Int? = nil, entry: UInt64) throws(PatchSiteError) -> (
    skip: Int, length: Int, movedEnd: Int, verbatim: Bool
  ) {
    let skip = startsWithEndbr64(code) ? X86Instruction.endbr64Length : 0
    let size = min(size ?? code.count, code.count)
    guard size > skip, code.count - skip >= SiteBytes.length else {
      throw PatchSiteError(reason: "shorter than the 5-byte branch", category: .short)
    }
    // Where the copy goes is not known yet: a trial at the site itself sizes the move.
    let body = UnsafeRawBufferPointer(rebasing: code[skip...])
    switch Result(catching: { () throws(X86Relocator.Refusal) in
      try X86Relocator.check(body, at: entry + UInt64(skip))
    }) {
    case .success(let relocation):
      // Past the function's end only padding may be taken (the function moved whole).
      guard relocation.movedEnd <= size - skip else {
        throw PatchSiteError(reason: "shorter than the 5-byte branch, and no padding follows it", category: .short)
      }
      return (skip, relocation.length, relocation.movedEnd, relocation.verbatim)
    case .failure(let refusal):
      throw PatchSiteError(reason: "its first instructions cannot be moved: \(refusal)", category: .unmovable(refusal))
    }
  }

  /// The trap site of the function at `entry` (`size` bytes, at least one instruction after its
  /// `endbr64`): its first instruction, moved alone, before its copy exists (`resume` 0).
  static func trap(at entry: UInt64, function: UInt64, size: Int) throws(PatchSiteError) -> PatchSite {
    let code = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(entry)), count: size)
    return try trap(code: code, entry: entry, function: function)
  }

  /// `trap(at:function:size:)` decided on the function's bytes.
  static func trap(code: UnsafeRawBufferPointer, entry: UInt64, function: UInt64) throws(PatchSiteError) -> PatchSite {
    let skip = startsWithEndbr64(code) ? X86Instruction.endbr64Length : 0
    let address = entry + UInt64(skip)
    guard code.count > skip else { throw PatchSiteError(reason: "no instruction after its endbr64", category: .short) }
    switch Result(catching: { () throws(X86Relocator.Refusal) in
      try X86Relocator.relocate(UnsafeRawBufferPointer(rebasing: code[skip...]), at: address, to: address, minimum: 1)
    }) {
    case .success(let relocation):
      return PatchSite(function: function, address: address, resume: 0, length: UInt8(relocation.length), shape: .trap)
    case .failure(let refusal):
      throw PatchSiteError(reason: "its first instruction cannot be moved: \(refusal)", category: .unmovable(refusal))
    }
  }

  /// How many bytes from `address` a survey of a function of `size` bytes reads: for one
  /// shorter than the branch (and an `endbr64`), on to `next` (where the next function starts,
  /// nil if none is known: looked for only then), at most 24 bytes past its end; else `size`.
  public static func surveySpan(size: UInt64, to next: @autoclosure () -> UInt64?, from address: UInt64) -> Int {
    guard size < UInt64(SiteBytes.length + X86Instruction.endbr64Length) else { return Int(size) }
    return Int(min(size + 24, next().map { $0 &- address } ?? .max))
  }

  /// Whether `code` begins with an `endbr64` (which stays where it is: indirect calls land on it).
  static func startsWithEndbr64(_ code: UnsafeRawBufferPointer) -> Bool {
    // f3 0f 1e fa, read as one word (`afterEndbr64`).
    code.count >= X86Instruction.endbr64Length && code.loadUnaligned(as: UInt32.self) == 0xfa1e_0ff3
  }

  /// How Tracery would trace the function whose code is `code` (its whole size) at `entry`, with
  /// prologue relocation on and only this thread running: at its NOP, by relocating its first
  /// instructions, by a trap on its first instruction (with why it is not relocated), or not
  /// at all (why). For coverage surveys (`tracery bench relocate`) of objects not loaded.
  /// `size`: the function's, when `code` goes on to where the next function starts (for
  /// functions shorter than the branch; see `relocated(code:size:...)`).
  public static func survey(
    code: UnsafeRawBufferPointer, size: Int? = nil, entry: UInt64, entryPoints: EntryPoints? = nil
  ) -> Survey {
    let skip = startsWithEndbr64(code) ? X86Instruction.endbr64Length : 0
    if code.count >= skip + SiteBytes.length,
      case .nop5 = X86Instruction.SiteShape(bytes: Array(code[skip..<skip + SiteBytes.length]), at: entry)
    {
      return .nop
    }
    if entryPoints?.lacksFrame(entry) == true { return .refused(.unframed) }
    do throws(PatchSiteError) {
      return .relocated(
        length: Int(
          try relocated(code: code, size: size, entry: entry, function: entry, entryPoints: entryPoints).length))
    } catch let notRelocated {
      do throws(PatchSiteError) {
        _ = try trap(
          code: UnsafeRawBufferPointer(rebasing: code[..<min(size ?? code.count, code.count)]), entry: entry,
          function: entry)
        return .trap(notRelocated.category)
      } catch {
        return .refused(error.category)
      }
    }
  }

  public enum Survey: Sendable, Equatable {
    case nop
    case relocated(length: Int)
    case trap(PatchSiteError.Category)
    case refused(PatchSiteError.Category)
  }

  /// `entry`, or right after the `endbr64` there (which indirect calls must still find): where a
  /// site is looked for, and where a relocated site's branch goes (what its events name).
  public static func afterEndbr64(_ entry: UInt64) -> UInt64 {
    // f3 0f 1e fa, read as one word (no arrays: this runs per function of a large attach).
    UnsafeRawPointer(bitPattern: UInt(entry))!.loadUnaligned(as: UInt32.self) == 0xfa1e_0ff3 ? entry + 4 : entry
  }

  /// This relocated or trap site with its copy at `copy`.
  func withCopy(at copy: UInt64) -> PatchSite {
    PatchSite(
      function: function, address: address, resume: copy, length: length, shape: shape, movesVerbatim: movesVerbatim)
  }
}

/// Why a function has no patch site (of a shape).
public struct PatchSiteError: Error, Sendable {
  public enum Category: Sendable, Hashable, CustomStringConvertible {
    case notNop
    /// Shorter than the branch (a trap site: no instruction after its endbr64).
    case short
    case unmovable(X86Relocator.Refusal)
    /// The function's own code branches into the bytes the branch would take.
    case branchedInto
    /// Other code of its object branches there, or an exception landing pad is there.
    case enteredFromElsewhere
    /// The sweep for such branches met bytes it could not decode.
    case unswept
    /// No call frame describes it while its object has them (`EntryPoints.unframed`): neither
    /// moved nor trapped, since its calls and returns may not be a function's.
    case unframed

    public var description: String {
      switch self {
      case .notNop: "no 5-byte NOP"
      case .short: "shorter than 5 bytes"
      case .unmovable(let refusal): "cannot move: \(X86Relocator.kind(of: refusal))"
      case .branchedInto: "its code branches into its first bytes"
      case .enteredFromElsewhere: "its object's code or a landing pad enters its first bytes"
      case .unswept: "its code does not decode to its end"
      case .unframed: "no call frame describes it (hand-written or generated code, such as a JIT's builtins)"
      }
    }
  }

  /// Said only when asked: a function without a NOP gets one of these before it is relocated,
  /// and describing its first bytes for nothing was ~3% of a relocating start.
  var reason: String { describe() }
  private let describe: @Sendable () -> String
  public let category: Category

  init(reason: @autoclosure @escaping @Sendable () -> String, category: Category = .notNop) {
    describe = reason
    self.category = category
  }
}

extension Tracer {
  /// The out-of-line copy of a relocated site's first instructions, placed near it, and the site
  /// with the copy as its `resume`. Called when the function is first planned (under the lock).
  /// Where in a trap site's copy block its pad lies: the `jmp` its int3 leads to
  /// (`patchRequest(from:for:)`), after the copy (at most 30 bytes for one instruction).
  static let trapPad = 64

  func relocatedCopy(of patch: PatchSite) throws -> (PatchSite, CodeImage) {
    let size = Int(patch.length) + 15
    // At most 5 instructions move (each at least a byte); the longest copy is a call's 25 bytes.
    let block = try arena.allocate(near: patch.address, size: 128)
    do {
      let code = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(patch.address)), count: size)
      if patch.movesVerbatim {
        // Their bytes and a jump back, without decoding them again (a traced program's start
        // relocates tens of thousands).
        var copy = CodeArena.Block.Writer(block)
        guard
          X86Relocator.putVerbatim(code, at: patch.address, length: Int(patch.length), to: block.address, into: &copy)
        else { throw AttachError.codeMemory("the relocated copy cannot jump back") }
        return (patch.withCopy(at: block.address), CodeImage(block: block, length: copy.count))
      }
      // The same instructions as when the site was chosen: those covering its length.
      let relocation = try X86Relocator.relocate(
        code, at: patch.address, to: block.address, minimum: Int(patch.length))
      // (A trap site's copy is one instruction, and its pad follows at `trapPad`.)
      guard relocation.length == Int(patch.length),
        relocation.bytes.count <= (patch.shape == .trap ? Self.trapPad : block.size)
      else {
        throw AttachError.codeMemory("the relocated copy changed size")
      }
      block.write(relocation.bytes)
      if patch.shape == .trap {
        // Until the function is traced its pad runs the function as it is.
        let pad = block.address + UInt64(Self.trapPad)
        guard let jmp = X86Instruction.jmp(at: pad, to: block.address) else {
          throw AttachError.codeMemory("the trap pad cannot reach the copy")
        }
        block.write(jmp, at: Self.trapPad)
        return (patch.withCopy(at: block.address), CodeImage(block: block, length: Self.trapPad + jmp.count))
      }
      return (patch.withCopy(at: block.address), CodeImage(block: block, length: relocation.bytes.count))
    } catch {
      arena.release(block)
      throw error
    }
  }
}
