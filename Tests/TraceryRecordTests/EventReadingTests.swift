import Glibc
import Testing

@testable import TraceryRecord

/// The thread file reader against bytes laid out by hand as the recorder lays them out (see
/// docs/trace-format.md): 16-byte entries, 8-byte exits, a chunk whose last 8 bytes stayed zero.
/// These files are format 2 (chunks without seals), which readers still read; the seals of
/// format 3 are tested in `ChunkSealTests`.
@Suite struct EventReadingTests {
  static let chunkSize = 48

  func header(chunkSize: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: TraceFormat.headerSize)
    bytes.replaceSubrange(0..<8, with: TraceFormat.magic)
    func store(_ value: UInt64, at offset: Int, count: Int) {
      for index in 0..<count { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    store(2, at: TraceFormat.Header.version, count: 4)
    store(42, at: TraceFormat.Header.pid, count: 4)
    store(43, at: TraceFormat.Header.tid, count: 4)
    store(UInt64(chunkSize), at: TraceFormat.Header.chunkSize, count: 8)
    return bytes
  }

  func read(_ bytes: [UInt8]) throws -> Trace.Thread {
    let (thread, damage) = readWithDamage(bytes)
    #expect(damage.isEmpty, "\(damage)")
    return try #require(thread)
  }

  func readWithDamage(_ bytes: [UInt8]) -> (thread: Trace.Thread?, damage: [Damage]) {
    let path = "/tmp/tracery-record-test-\(getpid())-\(UInt32.random(in: 0 ... .max))-42.0-43.events"
    #expect(Files.write(bytes, to: path))
    defer { unlink(path) }
    return Trace.readThread(path: path, name: "42.0-43.events")
  }

  /// `count` calls f(i) { g(i) } at depths 0 and 1, 100 ticks apart.
  func calls(_ count: Int) -> [Event] {
    (0..<count).flatMap { index -> [Event] in
      let time = UInt64(1_000_000 + 400 * index)
      return [
        Event(timestamp: time, site: 0x5555_0000_1000, depth: 0, kind: .entry),
        Event(timestamp: time + 100, site: 0x5555_0000_2000, depth: 1, kind: .entry),
        Event(timestamp: time + 200, site: 0x5555_0000_2000, depth: 1, kind: .exit),
        Event(timestamp: time + 300, site: 0x5555_0000_1000, depth: 0, kind: .exit),
      ]
    }
  }

  @Test func entriesExitsAndAChunkTail() throws {
    let a: UInt64 = 0x5555_0000_1000
    let b: UInt64 = 0x5555_0000_2000
    let c: UInt64 = 0x7f00_0000_3000
    let wrap: UInt64 = 1 << 48
    let events = [
      Event(timestamp: wrap - 100, site: a, depth: 0, kind: .entry),
      Event(timestamp: wrap - 90, site: b, depth: 1, kind: .entry),
      Event(timestamp: wrap - 80, site: b, depth: 1, kind: .exit),
      // chunk 0 ends here with 8 zero bytes: the next entry did not fit
      Event(timestamp: wrap - 10, site: c, depth: 1, kind: .entry),
      Event(timestamp: wrap + 5, site: c, depth: 1, kind: .exit),  // the counter's low bits wrapped
      Event(timestamp: wrap + 7, site: a, depth: 0, kind: .exit),
    ]
    var body = events[0..<3].flatMap(\.bytes)
    body += [UInt8](repeating: 0, count: Self.chunkSize - body.count)
    body += events[3...].flatMap(\.bytes)
    body += [UInt8](repeating: 0, count: 2 * Self.chunkSize - body.count)
    let thread = try read(header(chunkSize: Self.chunkSize) + body)
    #expect(thread.pid == 42 && thread.tid == 43)
    #expect(thread.events == events)
  }

  /// A data event of one value (as the agent's ValueRecorder writes it).
  func data(_ item: ValueSpec.Item, _ integer: UInt64, string: [UInt8]? = nil, truncated: Bool = false) -> [UInt8] {
    var payload = [UInt8](repeating: 0, count: DataEvent.size(stringLengths: [string?.count ?? 0]))
    payload.withUnsafeMutableBytes { buffer in
      let written =
        string.map { bytes in
          bytes.withUnsafeBytes {
            DataEvent.write(item, integer: integer, string: $0, truncated: truncated, to: buffer.baseAddress! + 8)
          }
        } ?? DataEvent.write(item, integer: integer, string: nil, truncated: false, to: buffer.baseAddress! + 8)
      buffer.storeBytes(of: DataEvent.header(payload: written), as: UInt64.self)
    }
    return payload
  }

  @Test func valuesBelongToTheEventBeforeThemAcrossALongChunkTail() throws {
    var entry = Event(timestamp: 500, site: 0x4000, depth: 0, kind: .entry)
    var exit = Event(timestamp: 900, site: 0x4000, depth: 0, kind: .exit)
    let name = Array("tracery".utf8)
    entry.values = [
      RecordedValue(source: 1, format: .string, integer: 0x1234, string: name, truncated: false)
    ]
    exit.values = [RecordedValue(source: 0, format: .hex, integer: 0x2a, string: nil, truncated: false)]
    var body = entry.bytes + data(.init(source: 1, format: .string), 0x1234, string: name)
    body += [UInt8](repeating: 0, count: 64 - body.count)  // 24 bytes: the next data event did not fit
    body += exit.bytes + data(.init(source: 0, format: .hex), 0x2a)
    body += [UInt8](repeating: 0, count: 128 - body.count)
    let thread = try read(header(chunkSize: 64) + body)
    #expect(thread.events == [entry, exit])
    #expect(thread.events.first?.values.first?.text == "\"tracery\"")
    #expect(thread.events.last?.values.first?.text == "0x2a")
  }

  @Test func aFileCutInsideAnEntryEndsBeforeItAndSaysSo() throws {
    let entry = Event(timestamp: 1000, site: 0x1000, depth: 0, kind: .entry)
    let exit = Event(timestamp: 1010, site: 0x1000, depth: 0, kind: .exit)
    let bytes = header(chunkSize: 1 << 20) + entry.bytes + exit.bytes + Array(entry.bytes.prefix(12))
    let (thread, damage) = readWithDamage(bytes)
    #expect(thread?.events == [entry, exit])
    #expect(damage.map(\.offset) == [TraceFormat.headerSize + 24])
    #expect(damage.first?.reason == "the file ends inside an event")
  }

  /// Header counts are whatever a file says: summed over a trace's threads they saturate (two
  /// damaged headers' sum trapped `info` and every reader that says how many events were dropped).
  @Test func headerCountsSumWithoutOverflow() throws {
    var bytes = header(chunkSize: Self.chunkSize)
    for offset in [TraceFormat.Header.dropped, TraceFormat.Header.foreignCalls] {
      bytes.replaceSubrange(offset..<(offset + 8), with: [UInt8](repeating: 0xff, count: 8))
    }
    let path = "/tmp/tracery-record-test-\(getpid())-\(UInt32.random(in: 0 ... .max))-42.0-43.events"
    #expect(Files.write(bytes, to: path))
    defer { unlink(path) }
    let file = try #require(ThreadFile.open(path: path, name: "42.0-43.events").file)
    #expect(file.dropped == .max && file.foreignCalls == .max)
    #expect([file, file].total { $0.dropped } == .max && [file, file, file].total { $0.foreignCalls } == .max)
    #expect([file].total { _ in 7 } + [ThreadFile]().total { $0.dropped } == 7)
  }

  @Test func aBadChunkSizeOrHeaderLosesTheFileAndSaysWhy() {
    #expect(
      readWithDamage(header(chunkSize: 12) + [1, 2, 3]).damage.first?.reason == "bad chunk size 12 in the header")
    #expect(readWithDamage([]).damage.first?.reason.hasPrefix("empty (0 bytes)") == true)
    #expect(readWithDamage([1, 2, 3]).damage.first?.reason.hasPrefix("truncated") == true)
    var wrongVersion = header(chunkSize: 64)
    wrongVersion[TraceFormat.Header.version] = 9
    #expect(
      readWithDamage(wrongVersion).damage.first?.reason == "format version 9; this tracery reads versions 2 to 3")
    #expect(readWithDamage(wrongVersion).thread == nil)
  }

  /// 64 scribbled bytes in the middle of a thread: every event before and after them is kept,
  /// and the damage is reported where it is.
  @Test(arguments: [0x00 as UInt8, 0xa5, 0xff, 0x40])
  func scribbledBytesLoseOnlyWhatTheyCover(fill: UInt8) throws {
    let events = calls(100)
    var body = events.flatMap(\.bytes)
    let at = 48 * 40 + 8  // inside call 40 (48 bytes each: two entries, two exits)
    body.replaceSubrange(at..<(at + 64), with: [UInt8](repeating: fill, count: 64))
    let (thread, damage) = readWithDamage(header(chunkSize: 1 << 20) + body)
    let kept = try #require(thread).events
    #expect(damage.count == 1, "\(damage)")
    // The damage begins at call 40's entry, whose counter the scribble covers.
    #expect(damage.first?.offset == TraceFormat.headerSize + 48 * 40)
    // Calls 0-39 and everything from the first intact entry after the damage.
    let firstDifference = kept.indices.first { $0 >= events.count || kept[$0] != events[$0] }
    #expect(firstDifference == 160, "\(kept.count) kept")
    let resumed = try #require(events.firstIndex { $0.timestamp == kept[160].timestamp && $0.kind == .entry })
    #expect(kept[160...].elementsEqual(events[resumed...]), "\(kept.count) kept, resumed at \(resumed)")
    #expect(resumed <= 160 + 16, "at most the calls the 64 bytes touched are lost")
  }

  @Test func zeroedBytesAtAChunkStartAreDamageNotTheEnd() throws {
    let events = calls(4)
    var body = Array(events.prefix(8).flatMap(\.bytes))
    body += [UInt8](repeating: 0, count: 256 - body.count)
    let second = events.suffix(8).flatMap(\.bytes)
    body += [UInt8](repeating: 0, count: 48) + second.dropFirst(48)
    body += [UInt8](repeating: 0, count: 512 - body.count)
    let (thread, damage) = readWithDamage(header(chunkSize: 256) + body)
    #expect(damage.first?.reason == "zeroed bytes among the events")
    #expect(thread?.events.prefix(8) == events.prefix(8))
    #expect(thread?.events.last == events.last)
  }

  @Test func aTraceWithAnEmptyThreadFileAndAnEmptyArgumentIsRead() throws {
    let directory = "/tmp/tracery-damaged-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    mkdir(directory, 0o700)
    defer {
      for name in Files.list(directory) ?? [] { unlink(directory + "/" + name) }
      rmdir(directory)
    }
    #expect(Files.write("tracery-trace 1\ncommand prog%20\n", to: directory + "/info"))
    let process = TracedProcess(
      session: "42.0", pid: 42, parent: 1, executable: "/bin/prog", arguments: ["/bin/prog", "", "x"],
      ticksPerNanosecond: 1, startTicks: 1_000_000, startRealtimeNanoseconds: 5, objects: [], tracedFunctions: 2)
    #expect(Files.write(process.text, to: directory + "/process-42.0.info"))
    #expect(Files.write(header(chunkSize: 1 << 20) + calls(3).flatMap(\.bytes), to: directory + "/42.0-43.events"))
    #expect(Files.write([], to: directory + "/42.0-44.events"))
    let trace = try Trace(directory: directory)
    #expect(trace.processes.first?.arguments == ["/bin/prog", "", "x"])
    #expect(trace.threads.map(\.tid) == [43])
    var cursor = EventCursor(try #require(trace.threads.first))
    var count = 0
    while cursor.next() != nil { count += 1 }
    #expect(count == 12)
    #expect(
      Trace.summary(of: trace.damage) == [
        "\(directory)/42.0-44.events: empty (0 bytes): the thread wrote nothing or the file was cut"
      ])
  }
}

extension EventReadingTests {
  /// 64 random bytes at 400 places (a fixed seed): every event before the damage is kept, the
  /// damage is reported where it begins, and what follows it is the original events again after
  /// at most the calls the bytes covered.
  @Test func randomScribblesAreReportedAndContained() {
    let events = calls(200)
    let body = events.flatMap(\.bytes)
    var seed: UInt64 = 0x9e37_79b9_7f4a_7c15
    func random() -> UInt64 {
      seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      return seed >> 11
    }
    var bogus = 0
    for _ in 0..<400 {
      var scribbled = body
      let at = Int(random() % UInt64(body.count - 64))
      for index in at..<(at + 64) { scribbled[index] = UInt8(truncatingIfNeeded: random()) }
      let (thread, damage) = readWithDamage(header(chunkSize: 1 << 20) + scribbled)
      guard let kept = thread?.events, let first = damage.first else {
        Issue.record("no damage reported for a scribble at \(at)")
        continue
      }
      let intactBefore = (first.offset - TraceFormat.headerSize) / 48 * 4
      #expect(first.offset - TraceFormat.headerSize <= at + 8)
      #expect(kept.prefix(intactBefore).elementsEqual(events.prefix(intactBefore)))
      let originals = Set(events.map { "\($0.timestamp) \($0.kind)" })
      bogus += kept.count { !originals.contains("\($0.timestamp) \($0.kind)") }
      #expect(kept.count >= events.count - 4 * 4, "a scribble at \(at) lost \(events.count - kept.count) events")
    }
    #expect(bogus <= 4, "\(bogus) events made up of scribbled bytes were taken")
  }
}

extension EventReadingTests {
  /// Words written out by hand from docs/trace-format.md (not by `Event.bytes`, the encoder under
  /// test elsewhere): entry = site | depth << 48 | 1 << 62, then the counter; exit = counter mod
  /// 2^48 | depth << 48 | 2 << 62.
  @Test func wordsLaidOutByHandFromTheFormatDocument() throws {
    let words: [UInt64] = [
      0x4000_5555_0000_1000, 1_000,  // entry, depth 0, site 0x555500001000, at 1000
      0x4001_5555_0000_2000, 1_100,  // entry, depth 1, site 0x555500002000, at 1100
      0x8001_0000_0000_04b0,  // exit, depth 1, at 1200
      0x8000_0000_0000_0514,  // exit, depth 0, at 1300
    ]
    let bytes = words.flatMap { word in (0..<8).map { UInt8(truncatingIfNeeded: word >> (8 * $0)) } }
    let events = try read(header(chunkSize: 1 << 20) + bytes).events
    #expect(events.map(\.kind) == [.entry, .entry, .exit, .exit])
    #expect(events.map(\.depth) == [0, 1, 1, 0])
    #expect(events.map(\.timestamp) == [1000, 1100, 1200, 1300])
    #expect(events.map(\.site) == [0x5555_0000_1000, 0x5555_0000_2000, 0x5555_0000_2000, 0x5555_0000_1000])
  }
}
