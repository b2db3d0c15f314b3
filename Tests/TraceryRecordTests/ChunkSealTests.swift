import CTraceryShims
import Glibc
import Testing

@testable import TraceryRecord

/// Format 3's chunk seals (`ChunkSeal`), laid out by hand: a changed word that still reads as
/// events, a file cut inside sealed events, bytes after them, a damaged seal, and an unsealed
/// last chunk are each told apart, reported once with their place, and every event around them
/// is kept.
@Suite struct ChunkSealTests {
  static let chunkSize = 1024

  /// 21 calls f { g } per chunk (48 bytes each, 1008 bytes after the 16-byte seal), counters
  /// running on across chunks.
  static func chunkEvents(_ chunk: Int) -> [Event] {
    (0..<21).flatMap { index -> [Event] in
      let time = UInt64(1_000_000 + 400 * (chunk * 21 + index))
      return [
        Event(timestamp: time, site: 0x5555_0000_1000, depth: 0, kind: .entry),
        Event(timestamp: time + 100, site: 0x5555_0000_2000, depth: 1, kind: .entry),
        Event(timestamp: time + 200, site: 0x5555_0000_2000, depth: 1, kind: .exit),
        Event(timestamp: time + 300, site: 0x5555_0000_1000, depth: 0, kind: .exit),
      ]
    }
  }

  /// A format 3 file of `chunks` chunks, each sealed unless `unsealedLast`; the last chunk holds
  /// `lastCalls` calls and is cut after them (as `tracery record` trims a file).
  static func file(
    chunks: Int, unsealedLast: Bool = false, lastCalls: Int = 21, chunkSize: Int = chunkSize
  ) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: TraceFormat.headerSize)
    bytes.replaceSubrange(0..<8, with: TraceFormat.magic)
    func store(_ value: UInt64, at offset: Int, count: Int) {
      for index in 0..<count { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    store(UInt64(TraceFormat.version), at: TraceFormat.Header.version, count: 4)
    store(42, at: TraceFormat.Header.pid, count: 4)
    store(43, at: TraceFormat.Header.tid, count: 4)
    store(UInt64(chunkSize), at: TraceFormat.Header.chunkSize, count: 8)
    for chunk in 0..<chunks {
      let events = chunkEvents(chunk).prefix(chunk == chunks - 1 ? lastCalls * 4 : 84)
      var body = [UInt8](repeating: 0, count: ChunkSeal.size) + events.flatMap(\.bytes)
      let length = body.count - ChunkSeal.size
      if chunk < chunks - 1 || !unsealedLast {
        body.withUnsafeMutableBytes { ChunkSeal.seal($0.baseAddress!, length: length) }
      }
      if chunk < chunks - 1 { body += [UInt8](repeating: 0, count: chunkSize - body.count) }
      bytes += body
    }
    return bytes
  }

  static func read(_ bytes: [UInt8]) -> (events: [Event], damage: [Damage]) {
    let path = "/tmp/tracery-seal-test-\(getpid())-\(UInt32.random(in: 0 ... .max))-42.0-43.events"
    #expect(Files.write(bytes, to: path))
    defer { unlink(path) }
    let (thread, damage) = Trace.readThread(path: path, name: "42.0-43.events")
    return (thread?.events ?? [], damage)
  }

  static func chunkStart(_ chunk: Int) -> Int { TraceFormat.headerSize + chunk * chunkSize }

  /// Trimming cuts a file down to its events, but never a file reached through a symbolic link
  /// (the directory may belong to the traced program's user, who could point a name anywhere).
  @Test func trimmingCutsTheFileButNotThroughALink() {
    let base = "/tmp/tracery-trim-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    var bytes = Self.file(chunks: 2, lastCalls: 3)
    bytes += [UInt8](repeating: 0, count: 4096)  // room reserved past the events, as a chunk has
    #expect(Files.write(bytes, to: base + ".events"))
    #expect(Files.write(bytes, to: base + ".other"))
    #expect(symlink(base + ".other", base + "-link.events") == 0)
    defer { for name in [".events", ".other", "-link.events"] { unlink(base + name) } }
    #expect(ThreadFile.trim(path: base + "-link.events") == 0)
    #expect(Files.read(base + ".other")?.count == bytes.count)
    let cut = ThreadFile.trim(path: base + ".events")
    #expect(cut > 0 && Files.read(base + ".events")?.count == bytes.count - cut, "cut \(cut) of \(bytes.count)")
  }

  /// A file with holes (a chunk's tail never written, the room reserved past the last event) is
  /// cut where the same bytes written whole are: the search for the last event skips the holes
  /// (`ByteWindow.lastDataEnd`) and still finds events that follow one.
  @Test func trimmingSkipsHolesAndCutsWhereTheWholeFileIsCut() throws {
    let base = "/tmp/tracery-trim-holes-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    defer { for name in [".dense.events", ".sparse.events"] { unlink(base + name) } }
    let chunk = 64 << 10
    let bytes = Self.file(chunks: 2, lastCalls: 3, chunkSize: chunk) + [UInt8](repeating: 0, count: 1 << 20)
    #expect(Files.write(bytes, to: base + ".dense.events"))
    let fd = open(base + ".sparse.events", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    try #require(fd >= 0 && ftruncate(fd, off_t(bytes.count)) == 0)
    // Only the 4 KiB blocks holding a non-zero byte are written.
    for block in stride(from: 0, to: bytes.count, by: 4096) {
      let piece = bytes[block..<min(block + 4096, bytes.count)]
      guard piece.contains(where: { $0 != 0 }) else { continue }
      #expect(Array(piece).withUnsafeBytes { pwrite(fd, $0.baseAddress, piece.count, off_t(block)) } == piece.count)
    }
    let hole = lseek(fd, off_t(TraceFormat.headerSize), ctracery_SEEK_HOLE)
    close(fd)
    // The file system keeps the holes (else this test would not try what it says).
    try #require(hole < off_t(TraceFormat.headerSize + chunk), "no hole in the first chunk's tail")
    let dense = ThreadFile.trim(path: base + ".dense.events")
    let sparse = ThreadFile.trim(path: base + ".sparse.events")
    #expect(
      dense >= (1 << 20) - 8 && sparse == dense,
      "size \(bytes.count): cut \(sparse) of the sparse file, \(dense) of the dense one")
    #expect(Self.read(Files.read(base + ".sparse.events") ?? []).events == Self.read(bytes).events)
  }

  @Test func sealedChunksReadWithoutDamage() {
    let (events, damage) = Self.read(Self.file(chunks: 3))
    #expect(damage.isEmpty, "\(damage)")
    #expect(events == (0..<3).flatMap(Self.chunkEvents))
  }

  /// One bit of a counter changed: every event still looks right (the old checks took it), the
  /// checksum does not.
  @Test func aFlippedBitIsReportedByItsChunkAndTheRestIsKept() {
    var bytes = Self.file(chunks: 3)
    let at = Self.chunkStart(1) + ChunkSeal.size + 8 * 48 + 8  // chunk 1, call 8's entry counter
    bytes[at] ^= 0x04
    let (events, damage) = Self.read(bytes)
    #expect(damage.count == 1, "\(damage)")
    #expect(damage.first?.offset == Self.chunkStart(1))
    #expect(damage.first?.reason.hasPrefix("checksum mismatch") == true)
    #expect(events.count == 3 * 84)
    #expect(events[..<84].elementsEqual(Self.chunkEvents(0)))
    #expect(events[168...].elementsEqual(Self.chunkEvents(2)))
  }

  @Test func aFileCutInsideSealedEventsSaysHowMuchIsMissing() {
    let bytes = Self.file(chunks: 3)
    let (events, damage) = Self.read(Array(bytes.dropLast(100)))
    #expect(damage.first?.offset == bytes.count - 100)
    #expect(damage.first?.bytes == 100)
    #expect(damage.first?.reason.contains("cut inside the chunk at \(Self.chunkStart(2))") == true, "\(damage)")
    // The two whole chunks, and the third's events before the cut: 18 calls (864 bytes), then
    // two entries and an exit (40 bytes) before 4 bytes of the next exit.
    #expect(events.prefix(168).elementsEqual((0..<2).flatMap(Self.chunkEvents)))
    #expect(events.count == 168 + 18 * 4 + 3)
  }

  @Test func bytesAfterTheSealedEventsAreReportedAndIgnored() {
    let bytes = Self.file(chunks: 2, lastCalls: 10)
    let junk = Self.chunkEvents(5).prefix(4).flatMap(\.bytes)  // events, even: not written here
    let (events, damage) = Self.read(bytes + junk)
    #expect(events == Self.chunkEvents(0) + Self.chunkEvents(1).prefix(40))
    #expect(damage.count == 1, "\(damage)")
    #expect(damage.first?.offset == bytes.count && damage.first?.bytes == 0, "\(damage)")
    #expect(damage.first?.reason.hasPrefix("\(junk.count) bytes after the sealed events") == true)
    #expect(damage.first?.reason.contains("not written by the recorder") == true)
  }

  @Test func aDamagedSealIsReportedAndItsEventsCheckedOneByOne() {
    var bytes = Self.file(chunks: 2)
    bytes[Self.chunkStart(0) + 7] = 0x11  // the marker's top byte
    let (events, damage) = Self.read(bytes)
    #expect(events == (0..<2).flatMap(Self.chunkEvents))
    #expect(damage.map(\.offset) == [Self.chunkStart(0)])
    #expect(damage.first?.reason.contains("seal of the chunk at \(TraceFormat.headerSize) is damaged") == true)
  }

  /// A thread still running when its process was killed: its last chunk has no seal. Not damage.
  @Test func anUnsealedLastChunkIsReadAsBefore() {
    let (events, damage) = Self.read(Self.file(chunks: 2, unsealedLast: true))
    #expect(damage.isEmpty, "\(damage)")
    #expect(events == (0..<2).flatMap(Self.chunkEvents))
  }

  /// The checksum notices a changed word anywhere and two words swapped.
  @Test func theChecksumSeesChangedAndMovedWords() {
    let words: [UInt64] = (0..<64).map { $0 &* 0x9e37_79b9_7f4a_7c15 }
    func sum(_ words: [UInt64]) -> UInt64 {
      var checksum = ChunkSeal.Checksum()
      words.withUnsafeBytes { checksum.add($0.baseAddress!, count: $0.count) }
      return checksum.value
    }
    let original = sum(words)
    for index in [0, 17, 63] {
      for bit in [0, 31, 63] {
        var changed = words
        changed[index] ^= 1 << UInt64(bit)
        #expect(sum(changed) != original)
      }
    }
    var swapped = words
    swapped.swapAt(3, 40)
    #expect(sum(swapped) != original)
  }
}
