import TraceryX86

/// How a function's first instructions move (`PatchSite.prologueMove`), decided once per object
/// from its file while `EntryPoints` sweeps it, for every later attach to look up instead of
/// decoding them again.
///
/// The decision depends on nothing but the bytes it read (the `endbr64` and the whole
/// instructions that move) and on no branch entering the bytes the branch takes, which the
/// object's targets tell once its sweep is done (`unentered`). It holds for the code in memory
/// only while that code begins with the same bytes: `site(at:size:)` compares them (a debugger's
/// `int3`, another tool's hook, or an object changed on disk since mean deciding from memory).
/// Kept only for moves of at most 16 bytes that take no padding (a short function moved whole
/// is decided from memory, where the bytes after it are known).
struct DecidedPrologue: Sendable {
  /// The function's first `skip + length` bytes, zero after them.
  private let head: (UInt64, UInt64)
  private let skip: UInt8
  /// 0: nothing decided.
  private let length: UInt8
  private let verbatim: Bool

  private static let none = DecidedPrologue(head: (0, 0), skip: 0, length: 0, verbatim: false)

  private init(head: (UInt64, UInt64), skip: UInt8, length: UInt8, verbatim: Bool) {
    self.head = head
    self.skip = skip
    self.length = length
    self.verbatim = verbatim
  }

  /// The move of the function whose code (as its file holds it, all of it) is `code`, at
  /// link-time address `start`.
  init(code: UnsafeRawBufferPointer, at start: UInt64) {
    guard let move = try? PatchSite.prologueMove(code: code, entry: start), move.movedEnd == move.length,
      move.skip + move.length <= 16
    else {
      self = .none
      return
    }
    var head: (UInt64, UInt64) = (0, 0)
    withUnsafeMutableBytes(of: &head) {
      $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: code[..<(move.skip + move.length)]))
    }
    self.init(head: head, skip: UInt8(move.skip), length: UInt8(move.length), verbatim: move.verbatim)
  }

  /// Its kept form (`EntryPoints.encoded`): the two head words, then skip, length and verbatim
  /// in the low three bytes of the third.
  var words: [UInt64] { [head.0, head.1, UInt64(skip) | UInt64(length) << 8 | (verbatim ? 1 << 16 : 0)] }

  /// A prologue from its kept form; nil when it could not have been decided so (a damaged file:
  /// `EntryPoints(encoded:bias:)` then sweeps the object again). What the words say of the
  /// bytes they hold is taken as the sweep wrote it: the file is the agent's own, and trusted as
  /// the entry points beside it are.
  init?(words: (UInt64, UInt64, UInt64)) {
    let (skip, length, verbatim) = (words.2 & 0xff, words.2 >> 8 & 0xff, words.2 >> 16)
    guard words.2 >> 17 == 0, skip == 0 || skip == UInt64(X86Instruction.endbr64Length) else { return nil }
    guard length > 0 else {
      guard words == (0, 0, 0) else { return nil }
      self = .none
      return
    }
    // The head holds its bytes and zeros after them; an endbr64 when it skips one.
    let count = Int(skip + length)
    let zeroed = withUnsafeBytes(of: (words.0, words.1)) { bytes in
      guard count <= 16 else { return false }
      let tail = bytes[count...].allSatisfy { $0 == 0 }
      return tail && (skip == 0 || PatchSite.startsWithEndbr64(bytes))
    }
    guard length >= UInt64(SiteBytes.length), zeroed else { return nil }
    self.init(head: (words.0, words.1), skip: UInt8(skip), length: UInt8(length), verbatim: verbatim == 1)
  }

  /// `decided`, parallel to `swept`, without the moves whose branch bytes (after the first) some
  /// code of the object enters: one of `targets` (sorted), which holds every direct branch of
  /// the swept code and the landing pads.
  static func unentered(
    _ decided: [DecidedPrologue], of swept: [(start: UInt64, end: UInt64)], targets: [UInt64]
  ) -> [DecidedPrologue] {
    var hint = 0
    return decided.indices.map { index in
      let decision = decided[index]
      guard decision.length > 0 else { return decision }
      let address = swept[index].start &+ UInt64(decision.skip)
      hint = targets.firstIndex(notBelow: address &+ 1, by: { $0 }, from: hint)
      let entered = hint < targets.count && targets[hint] < address &+ UInt64(SiteBytes.length)
      return entered ? .none : decision
    }
  }

  /// The relocated site of the function of `size` bytes at `entry` (runtime), when one was
  /// decided and the code there begins with the bytes it read.
  func site(at entry: UInt64, size: Int) -> PatchSite? {
    let count = Int(skip) + Int(length)
    guard length > 0, count <= size else { return nil }
    guard let code = UnsafeRawPointer(bitPattern: UInt(entry)) else { return nil }
    var live: (UInt64, UInt64) = (0, 0)
    if entry & 0xfff <= 0xff0 {
      // Two loads within the entry's page (mapped), the bytes past `count` masked off (a copy of
      // `count` bytes was a memmove call per function).
      func mask(_ bytes: Int) -> UInt64 { bytes >= 8 ? .max : (1 << (8 * UInt64(bytes))) - 1 }
      live.0 = code.loadUnaligned(as: UInt64.self) & mask(count)
      live.1 = code.loadUnaligned(fromByteOffset: 8, as: UInt64.self) & mask(max(0, count - 8))
    } else {
      withUnsafeMutableBytes(of: &live) { $0.copyMemory(from: UnsafeRawBufferPointer(start: code, count: count)) }
    }
    guard live == head else { return nil }
    return PatchSite(
      function: entry, address: entry + UInt64(skip), resume: 0, length: length, shape: .relocated,
      movesVerbatim: verbatim)
  }
}
