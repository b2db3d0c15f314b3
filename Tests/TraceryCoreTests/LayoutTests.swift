import CTracery
import CTraceryShims
import Testing
import TraceryX86

@testable import TraceryCore

/// The generated code reads and writes C structures at offsets the emitters spell as constants
/// (an immediate in an instruction cannot be computed at run time cheaply, and the constants
/// read better in the emitters): each one is checked here against the C layout in tracery.h,
/// so that a change on either side fails here, not in a traced program.
@Suite struct LayoutTests {
  func offset<T>(_ path: PartialKeyPath<T>) -> Int32 { Int32(MemoryLayout<T>.offset(of: path)!) }

  @Test func trampolineFrameIsATraceryCall() {
    #expect(TrampolineEmitter.frameSize == Int32(MemoryLayout<tracery_call>.size))
    #expect(TrampolineEmitter.functionOffset == offset(\tracery_call.function))
    #expect(TrampolineEmitter.returnAddressOffset == offset(\tracery_call.return_address))
    #expect(TrampolineEmitter.stackArgumentsOffset == offset(\tracery_call.stack_arguments))
    #expect(TrampolineEmitter.reservedOffset == offset(\tracery_call.reserved))
    #expect(TrampolineEmitter.argumentsOffset == offset(\tracery_call.arguments))
    #expect(TrampolineEmitter.raxOffset == offset(\tracery_call.rax))
    #expect(TrampolineEmitter.returnOffset == offset(\tracery_call.return_value))
    #expect(TrampolineEmitter.floatArgumentsOffset == offset(\tracery_call.float_arguments))
    #expect(TrampolineEmitter.floatReturnOffset == offset(\tracery_call.float_return))
    // The timed handler's start time lives in the padding word.
    #expect(TrampolineEmitter.timerOffset == offset(\tracery_call.padding))
  }

  @Test func threadFieldsMatchCtraceryThread() {
    let expected: [ThreadField: Int32] = [
      .top: offset(\ctracery_thread.shadow_top), .limit: offset(\ctracery_thread.shadow_limit),
      .cursor: offset(\ctracery_thread.event_cursor), .end: offset(\ctracery_thread.event_end),
      .dropped: offset(\ctracery_thread.dropped), .overflowed: offset(\ctracery_thread.overflowed),
      .stackLow: offset(\ctracery_thread.stack_low), .stackHigh: offset(\ctracery_thread.stack_high),
      .mark: offset(\ctracery_thread.event_mark), .foreignCalls: offset(\ctracery_thread.foreign_calls),
    ]
    for field in ThreadField.allCases { #expect(field.rawValue == expected[field], "\(field)") }
  }

  @Test func graphFrameMatchesTraceryGraphFrame() {
    #expect(GraphEmitter.frameSize == Int32(MemoryLayout<tracery_graph_frame>.size))
    #expect(GraphEmitter.siteOffset == offset(\tracery_graph_frame.site))
    #expect(GraphEmitter.returnOffset == offset(\tracery_graph_frame.return_address))
    #expect(GraphEmitter.stackArgumentsOffset == offset(\tracery_graph_frame.stack_arguments))
    #expect(GraphEmitter.depthOffset == offset(\tracery_graph_frame.depth))
    #expect(GraphEmitter.takenOffset == offset(\tracery_graph_frame.taken))
    #expect(GraphEmitter.dataOffset == offset(\tracery_graph_frame.data))
    #expect(GraphEmitter.dataWords * 8 == MemoryLayout.size(ofValue: tracery_graph_frame().data))
    #expect(GraphEmitter.resumeOffset == offset(\tracery_graph_frame.resume))
    // The handlers' call is the frame itself: its argument and result words are where a
    // tracery_call has them.
    #expect(offset(\tracery_graph_frame.arguments) == TrampolineEmitter.argumentsOffset)
    #expect(offset(\tracery_graph_frame.rax) == TrampolineEmitter.raxOffset)
    #expect(offset(\tracery_graph_frame.return_value) == TrampolineEmitter.returnOffset)
    #expect(offset(\tracery_graph_frame.float_arguments) == TrampolineEmitter.floatArgumentsOffset)
    #expect(offset(\tracery_graph_frame.float_return) == TrampolineEmitter.floatReturnOffset)
  }

  /// The ops and multi trampolines keep a tracery_call at the bottom of a bigger frame, their
  /// own words above it.
  @Test func opsAndMultiFramesHoldATraceryCall() {
    let call = Int32(MemoryLayout<tracery_call>.size)
    #expect(OpsEmitter.frame >= call)
    #expect(MultiEmitter.frame >= call && MultiEmitter.hazard >= call)
    for word in [MultiEmitter.hazard, MultiEmitter.cursor, MultiEmitter.remaining, MultiEmitter.skip] {
      #expect(word >= call && word + 8 <= MultiEmitter.frame)
    }
    // Both are entered with rsp 16-byte aligned (below two return addresses) and call handlers
    // from their frame: the frames keep the alignment.
    #expect(OpsEmitter.frame % 16 == 0 && MultiEmitter.frame % 16 == 0)
  }

  @Test func handlerKindsAndTheEventWordAreTheHeaders() {
    #expect(HandlerKind.entry.rawValue == UInt8(TRACERY_HANDLER_ENTRY.rawValue))
    #expect(HandlerKind.exit.rawValue == UInt8(TRACERY_HANDLER_EXIT.rawValue))
    #expect(HandlerKind.modifyReturn.rawValue == UInt8(TRACERY_HANDLER_MODIFY_RETURN.rawValue))
    #expect(GraphEmitter.depthMask == Int32(TRACERY_EVENT_DEPTH_MASK))
    #expect(TRACERY_EVENT_KIND_SHIFT == TRACERY_EVENT_DEPTH_SHIFT + 14)
  }

  @Test func multiRecordOffsets() {
    var words = [UInt64](repeating: 0xdead, count: 12)
    let size = words.withUnsafeMutableBufferPointer {
      MultiRecord.write(
        $0.baseAddress!, handlers: [(.exit, 0xe1, 1), (.entry, 0xa1, 2), (.modifyReturn, 0xb1, 3), (.entry, 0xa2, 4)])
    }
    #expect(size == MultiRecord.words(handlers: 4))
    func word(at offset: Int32) -> UInt64 { words[Int(offset) / 8] }
    #expect(word(at: MultiRecord.shapeOffset) == 0)
    #expect(word(at: MultiRecord.countOffset(.entry)) == 2)
    #expect(word(at: MultiRecord.countOffset(.modifyReturn)) == 1)
    #expect(word(at: MultiRecord.countOffset(.exit)) == 1)
    // Pairs grouped in the order the trampoline runs them: entries, modify-returns, exits.
    #expect(Array(words[Int(MultiRecord.pairsOffset) / 8..<size]) == [0xa1, 2, 0xa2, 4, 0xb1, 3, 0xe1, 1])
    // One handler: the shape is its kind, for the general and the bulk writer alike.
    for kind in HandlerKind.order {
      words.withUnsafeMutableBufferPointer { _ = MultiRecord.write($0.baseAddress!, handlers: [(kind, 0xa1, 9)]) }
      #expect(word(at: MultiRecord.shapeOffset) == UInt64(kind.rawValue))
      let general = Array(words[0..<MultiRecord.words(handlers: 1)])
      words.withUnsafeMutableBufferPointer { MultiRecord.write($0.baseAddress!, kind: kind, handler: 0xa1, cookie: 9) }
      #expect(Array(words[0..<MultiRecord.words(handlers: 1)]) == general)
    }
  }

  /// The graph stub is written byte by byte (`GraphEmitter.stub`): the same bytes X86Writer
  /// writes for its layout, its resume point and site word where the return handler reads them,
  /// and nil when a target is out of rel32 reach.
  @Test func graphStubIsWhatTheWriterWrites() throws {
    let base: UInt64 = 0x7f00_0000_1000
    let targets: [(body: UInt64, entry: UInt64, returnHandler: UInt64)] = [
      (base + 0x40, base + 0x2000, base + 0x2100), (base - 0x7000_0000, base + 0x7000_0000, base - 16),
    ]
    for (body, entry, returnHandler) in targets {
      var w = X86Writer(base: base)
      let untraced = w.newLabel()
      try w.putCall(address: entry)
      w.putJcc(.notEqual, untraced, short: true)
      try w.putCall(address: body)
      #expect(w.bytes.count == GraphEmitter.stubResumeOffset)
      try w.putJmp(address: returnHandler)
      w.bind(untraced)
      try w.putJmp(address: body)
      var expected = try w.finish()
      expected += [UInt8](repeating: 0xcc, count: Int(GraphEmitter.stubSiteOffset) - expected.count)
      withUnsafeBytes(of: UInt64(0x1234_5678_9abc).littleEndian) { expected += $0 }
      let bytes = GraphEmitter.stub(
        at: base, site: 0x1234_5678_9abc, body: body, entry: entry, returnHandler: returnHandler)
      #expect(bytes == expected)
      #expect(bytes?.count == GraphEmitter.stubSize)
    }
    #expect(GraphEmitter.stub(at: base, site: 1, body: base + 0x1_0000_0000, entry: base, returnHandler: base) == nil)
  }
}
