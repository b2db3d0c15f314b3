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
    /// back. Made only while the process has one thread (moving instructions a thread may be
    /// executing needs the checks of the trace-any-function issue) and when the function's own
    /// code never branches into the moved bytes.
    case relocated
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

  /// A compiler's 5-byte NOP at `address`, in the function that starts at `function`.
  public static func nop(at address: UInt64, function: UInt64? = nil) -> PatchSite {
    PatchSite(
      function: function ?? address, address: address, resume: address + UInt64(SiteBytes.length),
      length: UInt8(SiteBytes.length), shape: .nop)
  }

  /// The site of the function at `entry` (a mapped, executable address), by what its code
  /// holds: a 5-byte NOP at the entry, or right after an `endbr64` there. Throws the reason
  /// it has none.
  static func at(_ entry: UInt64, function: UInt64? = nil) throws(PatchSiteError) -> PatchSite {
    // The common case first, without building byte arrays.
    if SiteBytes(reading: entry).isNop5 { return .nop(at: entry, function: function ?? entry) }
    let address = afterEndbr64(entry)
    switch X86Instruction.SiteShape(bytes: TextPatcher.read(address), at: address) {
    case .nop5:
      return .nop(at: address, function: function ?? entry)
    case .nopSled:
      throw PatchSiteError(
        reason: "gcc's 5×1-byte NOP sled; convert it first (TextPatcher.convertSleds, one thread only)")
    case let shape:
      throw PatchSiteError(reason: "its entry holds \(shape), not a 5-byte NOP")
    }
  }

  /// Whether the body starts right after the branch, so that a `call` at the site returns into
  /// it (what shared trampolines entered by `call` rely on).
  public var bodyFollowsBranch: Bool { resume == address + UInt64(SiteBytes.length) }

  /// The relocated site of the function at `entry` (after its `endbr64`, which indirect calls
  /// must still find there), before its copy exists: `resume` is 0 until `withCopy(at:)`.
  /// `size` is the function's size from its symbol, for the sweep that looks for branches into
  /// the moved bytes.
  static func relocated(at entry: UInt64, function: UInt64, size: Int) throws(PatchSiteError) -> PatchSite {
    let address = afterEndbr64(entry)
    let available = Int(entry) + size - Int(address)
    guard available >= SiteBytes.length else { throw PatchSiteError(reason: "shorter than the 5-byte branch") }
    let code = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(address)), count: available)
    // Where the copy goes is not known yet: a trial at the site itself sizes the move.
    let trial = Result { () throws(X86Relocator.Refusal) in try X86Relocator.relocate(code, at: address, to: address) }
    let length: Int
    switch trial {
    case .success(let relocation): length = relocation.length
    case .failure(let refusal): throw PatchSiteError(reason: "its first instructions cannot be moved: \(refusal)")
    }
    let whole = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(entry)), count: size)
    switch X86Relocator.branchesIntoMovedRange(of: whole, at: entry, length: Int(address - entry) + length) {
    case nil: throw PatchSiteError(reason: "its code cannot be read through to look for branches into its start")
    case let found? where !found.isEmpty:
      throw PatchSiteError(reason: "its own code branches into its first \(length) bytes (at +\(found[0]))")
    default: break
    }
    return PatchSite(function: function, address: address, resume: 0, length: UInt8(length), shape: .relocated)
  }

  /// `entry`, or right after the `endbr64` there (which indirect calls must still find): where a
  /// site is looked for, and where a relocated site's branch goes (what its events name).
  public static func afterEndbr64(_ entry: UInt64) -> UInt64 {
    SiteBytes(reading: entry).bytes.prefix(4) == X86Instruction.endbr64[...] ? entry + 4 : entry
  }

  /// This relocated site with its copy at `copy`.
  func withCopy(at copy: UInt64) -> PatchSite {
    PatchSite(function: function, address: address, resume: copy, length: length, shape: shape)
  }
}

/// Why a function has no patch site.
struct PatchSiteError: Error {
  let reason: String
}

extension Tracer {
  /// The out-of-line copy of a relocated site's first instructions, placed near it, and the site
  /// with the copy as its `resume`. Called when the function is first planned (under the lock).
  func relocatedCopy(of patch: PatchSite) throws -> (PatchSite, CodeImage) {
    let size = Int(patch.length) + 15
    // At most 5 instructions move (each at least a byte); the longest copy is a call's 25 bytes.
    let block = try arena.allocate(near: patch.address, size: 128)
    do {
      let code = UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(patch.address)), count: size)
      let relocation = try X86Relocator.relocate(code, at: patch.address, to: block.address)
      guard relocation.length == Int(patch.length), relocation.bytes.count <= block.size else {
        throw AttachError.codeMemory("the relocated copy changed size")
      }
      block.write(relocation.bytes)
      return (patch.withCopy(at: block.address), CodeImage(block: block, length: relocation.bytes.count))
    } catch {
      arena.release(block)
      throw error
    }
  }
}
