"""Reading back the MP4s the kit writes (OpenCV), as RGB frames."""


def read_mp4(path):
    """The frames of ``path`` as [H, W, 3] uint8 RGB arrays."""
    import cv2

    cap, frames = cv2.VideoCapture(path), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
