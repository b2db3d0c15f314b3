import TraceryX86

/// One generated trampoline per site, each adding one to its own counter: the probe that the
/// foundation's tests and `tracery bench patch` attach. It touches only r11 and the flags, which
/// are free at a function's entry.
///
///     call mode (site holds `call tramp`):    jmp mode (site holds `jmp tramp`):
///       movabs r11, &counter[i]                  movabs r11, &counter[i]
///       lock inc qword [r11]                     lock inc qword [r11]
///       ret                                      jmp resume (the NOP site's PatchSite.resume)
///
/// Lifetime: the counters and code live until `deinit`, which must come after every site is
/// back to its original bytes (no thread can be inside a trampoline then).
package final class CountingTrampolines: @unchecked Sendable {
  // @unchecked: the counters are written only by generated code (atomically) and read by
  // `count(_:)`; the other stored properties are immutable.
  package enum Mode: Sendable { case call, jmp }

  package let sites: [UInt64]
  package let mode: Mode
  private let counters: UnsafeMutablePointer<UInt64>
  private let entries: [UInt64]
  private let blocks: [CodeArena.Block]
  private let arena: CodeArena

  static let stride = 32

  package init(sites: [UInt64], mode: Mode, arena: CodeArena = .shared) throws {
    self.sites = sites
    self.mode = mode
    self.arena = arena
    counters = .allocate(capacity: max(sites.count, 1))
    counters.initialize(repeating: 0, count: max(sites.count, 1))
    var entries = [UInt64](repeating: 0, count: sites.count)
    var blocks: [CodeArena.Block] = []
    // Group sites that one block can serve (sorted by address, within 1 GiB of the group's first).
    let order = sites.indices.sorted { sites[$0] < sites[$1] }
    var start = 0
    do {
      while start < order.count {
        var end = start
        while end < order.count && sites[order[end]] - sites[order[start]] < 1 << 30 { end += 1 }
        let block = try arena.allocate(near: sites[order[start]], size: (end - start) * Self.stride)
        blocks.append(block)
        var writer = X86Writer(base: block.address)
        for (slot, index) in order[start..<end].enumerated() {
          let entry = block.address + UInt64(slot * Self.stride)
          writer.putNop(count: Int(entry - writer.pc))
          entries[index] = entry
          writer.putMovabs(.r11, immediate: UInt64(UInt(bitPattern: counters + index)))
          writer.putInc(Memory(.r11), locked: true)
          switch mode {
          case .call: writer.putRet()
          case .jmp: try writer.putJmp(address: PatchSite.nop(at: sites[index]).resume)
          }
        }
        block.write(try writer.finish())
        start = end
      }
    } catch {
      for block in blocks { arena.release(block) }
      counters.deallocate()
      throw error
    }
    self.entries = entries
    self.blocks = blocks
  }

  deinit {
    for block in blocks { arena.release(block) }
    counters.deallocate()
  }

  /// The trampoline serving `sites[index]`.
  package func entry(_ index: Int) -> UInt64 { entries[index] }

  /// Calls counted for `sites[index]` so far.
  package func count(_ index: Int) -> UInt64 {
    UnsafeAtomicLoad.relaxed(counters + index)
  }

  /// The 5 bytes that send `sites[index]` to its trampoline.
  package func branch(_ index: Int) -> [UInt8] {
    switch mode {
    case .call: return X86Instruction.call(at: sites[index], to: entries[index])!
    case .jmp: return X86Instruction.jmp(at: sites[index], to: entries[index])!
    }
  }
}

/// A relaxed load of a word that generated code increments with `lock inc`.
enum UnsafeAtomicLoad {
  static func relaxed(_ pointer: UnsafeMutablePointer<UInt64>) -> UInt64 {
    // An aligned 8-byte load is single-copy atomic on x86-64; `volatile` semantics come from the
    // opaque pointer (the compiler cannot cache it across calls to generated code).
    UnsafeMutableRawPointer(pointer).load(as: UInt64.self)
  }
}
