import Glibc
import Testing

@testable import TraceryRecord

/// The thread file reader against bytes laid out by hand as the recorder lays them out (see
/// docs/trace-format.md): 16-byte entries, 8-byte exits, a chunk whose last 8 bytes stayed zero.
@Suite struct EventReadingTests {
  static let chunkSize = 48

  func header(chunkSize: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: TraceFormat.headerSize)
    bytes.replaceSubrange(0..<8, with: TraceFormat.magic)
    func store(_ value: UInt64, at offset: Int, count: Int) {
      for index in 0..<count { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    store(UInt64(TraceFormat.version), at: TraceFormat.Header.version, count: 4)
    store(42, at: TraceFormat.Header.pid, count: 4)
    store(43, at: TraceFormat.Header.tid, count: 4)
    store(UInt64(chunkSize), at: TraceFormat.Header.chunkSize, count: 8)
    return bytes
  }

  func read(_ bytes: [UInt8]) throws -> Trace.Thread {
    let path = "/tmp/tracery-record-test-\(getpid())-\(UInt32.random(in: 0 ... .max))-42.0-43.events"
    #expect(Files.write(bytes, to: path))
    defer { unlink(path) }
    return try Trace.readThread(path: path, name: "42.0-43.events")
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

  @Test func aFileCutInsideAnEntryEndsBeforeIt() throws {
    let entry = Event(timestamp: 1000, site: 0x1000, depth: 0, kind: .entry)
    let exit = Event(timestamp: 1010, site: 0x1000, depth: 0, kind: .exit)
    let bytes = header(chunkSize: 1 << 20) + entry.bytes + exit.bytes + Array(entry.bytes.prefix(12))
    #expect(try read(bytes).events == [entry, exit])
  }

  @Test func aBadChunkSizeIsCorrupt() {
    #expect(throws: TraceError.self) { try read(header(chunkSize: 12) + [1, 2, 3]) }
  }
}
