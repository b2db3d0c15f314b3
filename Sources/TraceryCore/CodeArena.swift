import CTraceryShims
import Synchronization
import TraceryX86

#if canImport(Glibc)
  import Glibc
#endif

/// Executable memory for generated code, within rel32 reach (±2 GiB) of the code that calls it.
///
/// Each slab is one memfd mapped twice: read+execute near the code it serves, and read+write at
/// an address nobody executes. No mapping is ever writable and executable at once. A block is
/// written through the alias before anything can branch to it (the patcher publishes the branch
/// only after its own core-serialising syncs), and never rewritten while it may run: replaced code
/// goes to a fresh block and the old one is released once no thread can be inside it.
///
/// Thread safety: all bookkeeping sits behind one mutex; blocks are value types that any thread
/// may write into until they are published.
public final class CodeArena: Sendable {
  public enum ArenaError: Error, Equatable, CustomStringConvertible {
    case noSpaceNear(address: UInt64, size: Int)
    case system(SystemError)

    public var description: String {
      switch self {
      case .noSpaceNear(let address, let size):
        return "no free address space for \(size) bytes of code within ±2 GiB of 0x\(String(address, radix: 16))"
      case .system(let error): return "cannot map code memory: \(error)"
      }
    }
  }

  /// A piece of executable memory handed out by the arena.
  public struct Block: Sendable, Equatable {
    /// Where the code runs (read+execute mapping).
    public let address: UInt64
    public let size: Int
    /// The same bytes, writable.
    let alias: UInt64

    /// The block as `count` words, through the writable alias: for data blocks (multi records)
    /// filled in place. Precondition: as `write`, and `8 * count <= size`.
    func words(count: Int) -> UnsafeMutablePointer<UInt64> {
      precondition(8 * count <= size, "words do not fit the block")
      return UnsafeMutablePointer<UInt64>(bitPattern: UInt(alias))!
    }

    /// Copies `code` into the block at `offset` (through the writable alias).
    /// Precondition: no thread can be executing this block yet.
    public func write(_ code: [UInt8], at offset: Int = 0) {
      precondition(offset >= 0 && offset + code.count <= size, "code does not fit its block")
      code.withUnsafeBytes { source in
        UnsafeMutableRawPointer(bitPattern: UInt(alias + UInt64(offset)))!.copyMemory(
          from: source.baseAddress!, byteCount: source.count)
      }
    }

    /// The addresses the block covers.
    public var range: Range<UInt64> { address..<(address + UInt64(size)) }

    /// Writes code into the block from its start, byte by byte in place (for many small pieces:
    /// 50,000 stubs built in an array and copied over were a sixth of a bulk attach).
    /// Invariant: `count <= block.size`; every write checks it (a precondition, not memory
    /// past the block). Same precondition as `write`.
    struct Writer: CodeSink {
      let block: Block
      /// Bytes written so far; the next lands at `address + count`. Lowering it takes back what
      /// was written past it.
      var count = 0

      init(_ block: Block) { self.block = block }

      /// Where the next byte runs.
      var address: UInt64 { block.address + UInt64(count) }
      var room: Int { block.size - count }

      private mutating func reserve(_ bytes: Int) -> UnsafeMutableRawPointer {
        precondition(bytes <= room, "code does not fit its block")
        defer { count += bytes }
        return UnsafeMutableRawPointer(bitPattern: UInt(block.alias + UInt64(count)))!
      }

      mutating func put(_ byte: UInt8) { reserve(1).storeBytes(of: byte, as: UInt8.self) }

      mutating func put(_ bytes: UnsafeRawBufferPointer) {
        guard let source = bytes.baseAddress else { return }
        reserve(bytes.count).copyMemory(from: source, byteCount: bytes.count)
      }

      mutating func put(_ bytes: [UInt8]) { bytes.withUnsafeBytes { put($0) } }

      /// `count` bytes that `body` writes in place, all of them (one reservation for a small
      /// record, where puts of a few bytes each cost more than the bytes).
      mutating func write(count: Int, _ body: (UnsafeMutableRawPointer) -> Void) { body(reserve(count)) }
    }

    /// Whether a rel32 branch at any address in `range` can reach every byte of the block.
    public func isReachable(from site: UInt64) -> Bool {
      CodeArena.reaches(site, address) && CodeArena.reaches(site, address + UInt64(size))
    }
  }

  struct Slab {
    let address: UInt64
    let alias: UInt64
    let size: Int
    /// Free ranges as (offset, length), sorted by offset, coalesced.
    var free: [(offset: Int, length: Int)]
  }

  /// Default slab size. Trampolines are tens to hundreds of bytes.
  static let slabSize = 1 << 20
  /// Margin kept inside ±2 GiB so every byte of a slab is reachable from anywhere near the code.
  static let reach: UInt64 = (1 << 31) - (1 << 24)
  public static let granule = 16

  public static let shared = CodeArena()

  private let slabs = Mutex<[Slab]>([])

  public init() {}

  static func reaches(_ a: UInt64, _ b: UInt64) -> Bool {
    (a > b ? a - b : b - a) < reach
  }

  /// Alignment for code on a hot path: the entry of a trampoline at the start of a 64-byte
  /// fetch window. Measured: an entry trampoline at 32 bytes into a window cost 0.4 ns more per
  /// call than the same code at its start.
  public static let hotCodeAlignment = 64

  /// A block of at least `size` bytes, `alignment`-byte aligned (a multiple of 16), reachable by
  /// rel32 from `near`.
  public func allocate(near: UInt64, size: Int, alignment: Int = granule) throws(ArenaError) -> Block {
    precondition(alignment >= Self.granule && alignment % Self.granule == 0, "alignment must be a multiple of 16")
    // Aligned blocks are whole multiples of their alignment, so that a run of them leaves no
    // gaps: a gap is a free-list entry, and thousands of them made first fit quadratic (50,000
    // trampolines took 3.4 s to place instead of 0.34 s).
    let unit = max(Self.granule, alignment)
    let length = max(unit, (size + unit - 1) / unit * unit)
    let result: Result<Block, ArenaError> = slabs.withLock { slabs in
      for index in slabs.indices
      where Self.reaches(near, slabs[index].address)
        && Self.reaches(near, slabs[index].address + UInt64(slabs[index].size))
      {
        if let block = Self.take(length, alignment: alignment, from: &slabs[index]) { return .success(block) }
      }
      do throws(ArenaError) {
        var slab = try Self.makeSlab(near: near, size: max(Self.slabSize, Int(System.pageEnd(UInt64(length)))))
        let block = Self.take(length, alignment: alignment, from: &slab)!
        slabs.append(slab)
        return .success(block)
      } catch {
        return .failure(error)
      }
    }
    return try result.get()
  }

  /// Gives back the end of `block` past its first `size` bytes (rounded up to 16); returns the
  /// rest. Precondition: nothing uses the bytes given back.
  func trim(_ block: Block, to size: Int) -> Block {
    let kept = max(Self.granule, (size + Self.granule - 1) / Self.granule * Self.granule)
    guard kept < block.size else { return block }
    let offset = UInt64(kept)
    release(Block(address: block.address + offset, size: block.size - kept, alias: block.alias + offset))
    return Block(address: block.address, size: kept, alias: block.alias)
  }

  /// Stores each value into the 8-byte aligned word at its address (inside a block of this
  /// arena) through the writable alias, one release store each: for the few data words that
  /// live code reads while they change (`MultiStub`'s record word). Precondition: every address
  /// lies in a block handed out and not released.
  func storeWords(_ words: [(address: UInt64, value: UInt64)]) {
    guard !words.isEmpty else { return }
    slabs.withLock { slabs in
      for (address, value) in words {
        precondition(address % 8 == 0, "a live word must be aligned")
        let slab = slabs.first { address >= $0.address && address - $0.address < UInt64($0.size) }!
        ctracery_store_release(UnsafeMutablePointer(bitPattern: UInt(slab.alias + (address - slab.address)))!, value)
      }
    }
  }

  /// Returns `block` to the arena. Precondition: no thread is inside it or can return into it
  /// (the caller's grace period has passed).
  public func release(_ block: Block) { release(contentsOf: [block]) }

  /// Returns many blocks at once: one sort and one coalescing pass per slab.
  public func release(contentsOf blocks: [Block]) {
    guard !blocks.isEmpty else { return }
    slabs.withLock { slabs in
      var returned = [[(offset: Int, length: Int)]](repeating: [], count: slabs.count)
      for block in blocks {
        guard
          let index = slabs.firstIndex(where: {
            block.address >= $0.address && block.address < $0.address + UInt64($0.size)
          })
        else { preconditionFailure("released a block the arena does not own") }
        returned[index].append((Int(block.address - slabs[index].address), block.size))
      }
      for index in slabs.indices where !returned[index].isEmpty {
        let all = (slabs[index].free + returned[index]).sorted { $0.offset < $1.offset }
        var merged: [(offset: Int, length: Int)] = []
        merged.reserveCapacity(all.count)
        for range in all {
          if let last = merged.last, last.offset + last.length == range.offset {
            merged[merged.count - 1].length += range.length
          } else {
            merged.append(range)
          }
        }
        slabs[index].free = merged
      }
    }
  }

  /// Every slab's code, in the order they were mapped (slabs are never unmapped).
  var slabRanges: [Range<UInt64>] {
    slabs.withLock { $0.map { $0.address..<($0.address + UInt64($0.size)) } }
  }

  /// Bytes currently handed out, for tests and statistics.
  public var bytesInUse: Int {
    slabs.withLock { slabs in slabs.reduce(0) { $0 + $1.size - $1.free.reduce(0) { $0 + $1.length } } }
  }

  /// First fit. Slabs are page-aligned, so aligning the offset aligns the address; the bytes
  /// skipped before an aligned block stay free.
  private static func take(_ length: Int, alignment: Int, from slab: inout Slab) -> Block? {
    func alignedStart(_ range: (offset: Int, length: Int)) -> Int {
      (range.offset + alignment - 1) / alignment * alignment
    }
    guard
      let index = slab.free.firstIndex(where: { alignedStart($0) + length <= $0.offset + $0.length })
    else { return nil }
    let range = slab.free[index]
    let offset = alignedStart(range)
    let tail = (offset: offset + length, length: range.offset + range.length - offset - length)
    if offset > range.offset {
      slab.free[index].length = offset - range.offset
      if tail.length > 0 { slab.free.insert(tail, at: index + 1) }
    } else if tail.length > 0 {
      slab.free[index] = tail
    } else {
      slab.free.remove(at: index)
    }
    return Block(address: slab.address + UInt64(offset), size: length, alias: slab.alias + UInt64(offset))
  }

  private static func makeSlab(near: UInt64, size: Int) throws(ArenaError) -> Slab {
    let fd: Int32
    do { fd = try System.memfd(name: "tracery-code", size: size) } catch { throw .system(error) }
    defer { System.close(fd) }
    // Other threads may map memory between reading the map and mapping: retry a few times, the
    // first time with the last map read (`MemoryMap.recent`), then with fresh ones.
    for attempt in 0..<8 {
      guard let hint = placement(near: near, size: UInt64(size), in: attempt == 0 ? .recent() : .fresh()) else {
        if attempt == 0 { continue }
        break
      }
      let code: UInt64
      do {
        code = try System.mmap(
          at: hint, length: size, protection: PROT_READ | PROT_EXEC, flags: MAP_SHARED, fd: fd, fixedNoReplace: true)
      } catch {
        if error.errno == EEXIST { continue }
        throw .system(error)
      }
      do {
        let alias = try System.mmap(
          at: nil, length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: fd)
        MemoryMap.mapped([
          .init(start: code, end: code + UInt64(size), readable: true, writable: false, executable: true, named: true),
          .init(start: alias, end: alias + UInt64(size), readable: true, writable: true, executable: false),
        ])
        return Slab(address: code, alias: alias, size: size, free: [(0, size)])
      } catch {
        System.munmap(code, size)
        throw .system(error)
      }
    }
    throw .noSpaceNear(address: near, size: size)
  }

  /// A page-aligned address for `size` bytes in the unmapped gap nearest to `near`, every byte
  /// within reach of it.
  static func placement(near: UInt64, size: UInt64, in map: MemoryMap = .fresh()) -> UInt64? {
    let page = System.pageSize
    let low = near > reach ? System.pageEnd(near - reach) : page * 16
    let high = System.pageStart(min(near &+ reach, 0x7fff_ffff_f000) - size)
    guard high > low else { return nil }
    var best: UInt64?
    var bestDistance = UInt64.max
    for gap in map.gaps(atLeast: size, within: low..<(high + size)) {
      // Closest point of the gap to `near`, kept one page away from its neighbours.
      let first = System.pageEnd(gap.lowerBound) + page
      let last = System.pageStart(gap.upperBound - size) - page
      guard last >= first else { continue }
      let candidate = near <= first ? first : (near >= last ? last : System.pageStart(near))
      let distance = candidate > near ? candidate - near : near - candidate
      if distance < bestDistance {
        best = candidate
        bestDistance = distance
      }
    }
    return best
  }
}
