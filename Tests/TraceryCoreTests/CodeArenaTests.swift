import CTraceryShims
import Foundation
import Testing
import TraceryFixtures
import TraceryX86

@testable import TraceryCore

@Suite struct CodeArenaTests {
  /// Code lands within rel32 reach of the address asked for, runs, and is never in a mapping that
  /// is writable and executable at once.
  @Test func blocksAreReachableRunnableAndNeverWritableExecutable() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    let block = try arena.allocate(near: near, size: 64)
    #expect(block.isReachable(from: near))
    #expect(block.address % 16 == 0)
    var writer = X86Writer(base: block.address)
    writer.putLea(.rax, Memory(.rdi, 1))  // return x + 1
    writer.putRet()
    block.write(try writer.finish())
    let function = unsafeBitCast(
      UnsafeRawPointer(bitPattern: UInt(block.address))!, to: (@convention(c) (Int) -> Int).self)
    #expect(function(41) == 42)
    let map = MemoryMap.current()
    let region = try #require(map.region(containing: block.address))
    #expect(region.executable && !region.writable)
    #expect(!map.regions.contains { $0.writable && $0.executable })
  }

  /// Inside `MemoryMap.fixed` (the agent's start) every look at the mappings is the one
  /// snapshot, and a slab the arena maps meanwhile is in it: a trap site's pad, patched in the
  /// same start, lies in a new slab, and was refused as "not executable" before `mapped`.
  @Test func aFixedMapIsOneReadingAndLearnsTheArenasSlabs() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    try MemoryMap.fixed {
      let before = MemoryMap.current()
      let block = try arena.allocate(near: near, size: 64)
      let after = MemoryMap.current()
      #expect(!before.isExecutable(block.address, count: 64))
      #expect(after.isExecutable(block.address, count: 64))
      #expect(after.regions.count == before.regions.count + 2)
      // A mapping made behind the pin's back is not seen: the map is not read again.
      let page = mmap(nil, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
      defer { munmap(page, 4096) }
      let address = UInt64(UInt(bitPattern: page))
      #expect(!MemoryMap.current().isExecutable(address, count: 1))
      #expect(MemoryMap.fresh().isExecutable(address, count: 1))
    }
    // Outside, each look reads again.
    let block = try arena.allocate(near: near, size: 64)
    #expect(MemoryMap.current().isExecutable(block.address, count: 64))
  }

  /// The main thread's stack bounds the graph takes from the last memory map read
  /// (`GraphThreads.setMainThreadStack`, sparing glibc's own reading of /proc/self/maps) are
  /// glibc's, as `pthread_getattr_np` gives them; also with a small stack limit, where the
  /// mapping's part above `__libc_stack_end` comes off it.
  @Test func theMainThreadsStackBoundsAreGlibcs() throws {
    var limit = rlimit()
    #expect(getrlimit(Int32(RLIMIT_STACK.rawValue), &limit) == 0)
    for cap: rlim_t in [.max, 1 << 20] {
      var changed = limit
      changed.rlim_cur = min(limit.rlim_cur, cap)
      #expect(setrlimit(Int32(RLIMIT_STACK.rawValue), &changed) == 0)
      defer { _ = setrlimit(Int32(RLIMIT_STACK.rawValue), &limit) }
      var low: UInt64 = 0
      var high: UInt64 = 0
      #expect(tracery_main_thread_stack(&low, &high) == 0)
      let stack = try #require(
        MemoryMap.fresh().mainThreadStack(stackEnd: ctracery_libc_stack_end(), limit: UInt64(changed.rlim_cur)))
      #expect(stack.low == low && stack.high == high, "\(stack) against glibc's \(low)..<\(high)")
    }
  }

  @Test func releasedSpaceIsReusedAndFarRequestsGetTheirOwnSlab() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    let first = try arena.allocate(near: near, size: 100)
    #expect(first.size == 112)
    let second = try arena.allocate(near: near, size: 16)
    #expect(second.address == first.address + 112)
    #expect(arena.bytesInUse == 128)
    arena.release(first)
    let third = try arena.allocate(near: near, size: 48)
    #expect(third.address == first.address)
    arena.release(second)
    arena.release(third)
    #expect(arena.bytesInUse == 0)
    // 64 GiB away from the first slab: out of its reach, so a new slab near the new address.
    let far = near &+ (64 << 30)
    let farBlock = try arena.allocate(near: far, size: 16)
    #expect(farBlock.isReachable(from: far))
    #expect(!farBlock.isReachable(from: near))
  }

  /// Hot code starts a 64-byte fetch window and takes whole windows, so a run of hot blocks
  /// leaves no gaps; the space skipped after a small block is handed out to the next small
  /// request, and everything returns to the arena.
  @Test func alignedBlocksLeaveTheSkippedSpaceFree() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    let small = try arena.allocate(near: near, size: 16)
    let hot = try arena.allocate(near: near, size: 100, alignment: CodeArena.hotCodeAlignment)
    #expect(hot.address % 64 == 0)
    #expect(hot.address == small.address + 64)
    #expect(hot.size == 128)
    let next = try arena.allocate(near: near, size: 70, alignment: CodeArena.hotCodeAlignment)
    #expect(next.address == hot.address + 128)
    let filler = try arena.allocate(near: near, size: 48)
    #expect(filler.address == small.address + 16)
    #expect(arena.bytesInUse == 16 + 128 + 128 + 48)
    arena.release(contentsOf: [small, hot, next, filler])
    #expect(arena.bytesInUse == 0)
  }

  /// Executable ranges merge across adjacent mappings, and the hint of a previous answer never
  /// makes a later one wrong.
  @Test func memoryMapAnswersExecutableRangesWithAndWithoutAHint() {
    let text = "1000-2000 r-xp 0 0:0 0 a\n2000-3000 r-xp 0 0:0 0 a\n3000-4000 rw-p 0 0:0 0\n5000-6000 r-xp 0 0:0 0 b\n"
    let map = MemoryMap(parsing: Array(text.utf8))
    #expect(map.isExecutable(0x1ffe, count: 5))
    #expect(!map.isExecutable(0x2ffe, count: 5))
    #expect(!map.isExecutable(0x3000, count: 1))
    #expect(!map.isExecutable(0xfff, count: 2))
    var hint = 0
    let answers = [0x1000, 0x2500, 0x2ffb, 0x2ffc, 0x4ffb, 0x5000, 0x5ffb, 0x5ffc, 0x1004].map {
      map.isExecutable(UInt64($0), count: 5, hint: &hint)
    }
    #expect(answers == [true, true, true, false, false, true, true, false, true])
  }
}
